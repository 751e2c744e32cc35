"""Hostile and careless input: each case gets a clear client error naming what is wrong, or a
correct result. Grouped by class: slow image URLs, focal lengths, request fields, hostile
splat files for `convert`, and start-up configuration.

The slow servers are real sockets on 127.0.0.1 driven by a thread of this test; every case
is bounded in time by the limit it checks.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from handler_support import REPO, SAMPLE, worker_server
from PIL import Image, TiffImagePlugin

from engine.io.images import FocalLengthError, decode_image, focal_length_range_px
from engine.results import NonFiniteError, OutputOptions, encode_prediction
from engine.runtime.predictor import Prediction
from engine.settings import EngineSettings, SettingsError
from engine.splats.formats.ply import read_ply
from engine.splats.formats.sog import write_sog
from engine.splats.formats.sog_reader import read_sog
from engine.splats.formats.spz import read_spz, write_spz
from engine.splats.gaussians import Gaussians
from handler.fetch import FetchError, FetchPolicy, fetch
from handler.inputs import InputError, decode_base64_image, parse_request

# --- 1. image URLs: one deadline, however the server behaves ------------------------------

TOTAL_S = 1.0
POLICY = FetchPolicy(1_000_000, connect_timeout_s=2, total_timeout_s=TOTAL_S, allow_private=True)
# The deadline plus what a shared, busy machine may add before the error is raised.
SLACK_S = 1.5

Script = Callable[[socket.socket, threading.Event], None]


@contextmanager
def raw_server(script: Script) -> Iterator[int]:
    """A TCP server on loopback that runs `script` on every connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_run, args=(conn,), daemon=True).start()

    def _run(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                script(conn, stop)
            except OSError:  # the client hung up, as it should at its deadline
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def drip(*parts: bytes, every_s: float, then: bytes = b"", repeat: bool = False) -> Script:
    """Send `parts` one at a time, `every_s` apart (forever when `repeat`), then `then`."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            for part in parts:
                if stop.wait(every_s):
                    return
                conn.sendall(part)
            if not repeat:
                break
        conn.sendall(then)
        stop.wait(30)

    return script


def _status_line_byte_by_byte() -> Script:
    return drip(*(bytes([b]) for b in b"HTTP/1.1 200 OK\r\n"), every_s=0.1)


def _headers_dripping() -> Script:
    return drip(b"HTTP/1.1 200 OK\r\n", *[b"X-Drip: 1\r\n"] * 50, every_s=0.1)


def _endless_continue() -> Script:
    # No pause at all: every read is instant, only the deadline can end it.
    def script(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 64)

    return script


def _chunk_size_byte_by_byte() -> Script:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.wait(0.1):
            conn.sendall(b"0")  # a chunk-size line that never ends

    return script


def _slow_body() -> Script:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    return drip(head, *[b"\xff"] * 1000, every_s=0.05)


def _silent() -> Script:
    return lambda conn, stop: stop.wait(30)


@pytest.mark.parametrize(
    ("script", "scheme", "stage"),
    [
        (_status_line_byte_by_byte, "http", "waiting for the status line and headers"),
        (_headers_dripping, "http", "waiting for the status line and headers"),
        (_endless_continue, "http", "waiting for the status line and headers"),
        (_silent, "http", "waiting for the status line and headers"),
        (_chunk_size_byte_by_byte, "http", "reading the image"),
        (_slow_body, "http", "reading the image"),
        (_silent, "https", "negotiating TLS"),
    ],
    ids=["status-line", "headers", "100-continue", "silent", "chunk-size", "body", "tls"],
)
def test_a_slow_server_is_cut_off_at_the_deadline(script, scheme, stage):
    with raw_server(script()) as port:
        start = time.monotonic()
        with pytest.raises(FetchError) as failure:
            fetch(f"{scheme}://127.0.0.1:{port}/a.jpg", POLICY)
        elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "longer than 1 s, the limit on the whole download (SHARP_URL_TIMEOUT_S)" in message
    assert stage in message
    assert TOTAL_S <= elapsed < TOTAL_S + SLACK_S


def test_slow_redirects_share_one_deadline():
    def script(conn: socket.socket, stop: threading.Event) -> None:
        if not stop.wait(0.4):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n")

    with raw_server(script) as port:
        start = time.monotonic()
        with pytest.raises(FetchError, match="SHARP_URL_TIMEOUT_S"):
            fetch(f"http://127.0.0.1:{port}/a.jpg", POLICY)
        assert time.monotonic() - start < TOTAL_S + SLACK_S


def test_a_hung_name_lookup_ends_at_the_deadline():
    def hung(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["127.0.0.1"]

    start = time.monotonic()
    with pytest.raises(FetchError, match="SHARP_URL_TIMEOUT_S.*while resolving slow.test"):
        fetch("http://slow.test/a.jpg", POLICY, resolve=hung)
    assert time.monotonic() - start < TOTAL_S + SLACK_S


def test_the_connection_limit_is_named():
    def unanswered(address: tuple[str, int], timeout: float) -> socket.socket:
        raise TimeoutError("timed out")

    with pytest.raises(FetchError, match=r"no answer within 2 s.*SHARP_URL_CONNECT_TIMEOUT_S"):
        fetch("http://127.0.0.1:9/a.jpg", POLICY, connect=unanswered)


def test_a_quick_server_after_the_slow_ones_is_still_fetched():
    body = b"\x89PNG" + bytes(5000)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + head + chunks + b"0\r\n\r\n")

    with raw_server(script) as port:
        assert fetch(f"http://127.0.0.1:{port}/a.jpg", POLICY) == body


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://{'a' * 64}.example.com/a.jpg", "a label of 64 characters"),
        (f"http://{'a.' * 130}com/a.jpg", "DNS allows at most 253"),
        ("http://a..b/a.jpg", "a label of 0 characters"),
        ("http://\ud800.test/a.jpg", "cannot resolve the host name"),
        ("http://[1:2:3]/a.jpg", "image_url is not a valid URL"),
    ],
)
def test_impossible_host_names_are_the_clients_error(url, message):
    with pytest.raises(FetchError, match=message):
        fetch(url, POLICY)


# --- 2. focal lengths: a physical range, and nothing non-finite leaves -----------------------

EXIF_IFD = 0x8769
FOCAL_LENGTH = 0x920A
FOCAL_LENGTH_35MM = 0xA405


def png_with_exif(exif_tags: dict[int, object], size: tuple[int, int] = (64, 48)) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "test"  # Pillow's PNG writer drops EXIF whose IFD0 is empty
    exif.get_ifd(EXIF_IFD).update(exif_tags)
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


PLAIN_PNG = png_with_exif({})


@pytest.mark.parametrize("value", [1e-30, 1e-3, 1.0, 1e5, 1e30, 1e308])
def test_a_requested_focal_length_out_of_range_is_refused(value):
    with pytest.raises(FocalLengthError, match=re.escape(f"focal_length_px={value:g} is out of")):
        decode_image(PLAIN_PNG, focal_length_px=value)


@pytest.mark.parametrize("value", [10**400, math.inf, math.nan, -5.0, 0, True, "50"])
def test_a_requested_focal_length_that_is_no_length_is_refused(value):
    with pytest.raises(FocalLengthError, match="--focal-px must be a positive number"):
        decode_image(PLAIN_PNG, focal_length_px=value, focal_length_field="--focal-px")


def test_the_range_is_a_diagonal_field_of_view_of_1_to_160_degrees():
    low, high = focal_length_range_px(64, 48)
    half_diagonal = 40.0
    assert math.degrees(2 * math.atan(half_diagonal / low)) == pytest.approx(160)
    assert math.degrees(2 * math.atan(half_diagonal / high)) == pytest.approx(1)
    for value in (low, high):
        decoded = decode_image(PLAIN_PNG, focal_length_px=value)
        assert (decoded.focal_length_px, decoded.focal_length_source) == (value, "override")


@pytest.mark.parametrize(
    ("tags", "source", "f_35mm"),
    [
        (
            {FOCAL_LENGTH: TiffImagePlugin.IFDRational(1, 4_000_000_000)},
            "default (EXIF FocalLength of 2.5e-10 mm ignored as out of range)",
            30.0,
        ),
        (
            {FOCAL_LENGTH_35MM: 60000, FOCAL_LENGTH: 50.0},
            "exif_focal_length (EXIF FocalLengthIn35mmFilm of 60000 mm ignored as out of range)",
            50.0,
        ),
        ({FOCAL_LENGTH: 1e6}, "default (EXIF FocalLength of 1e+06 mm ignored as out of range)", 30),
        ({FOCAL_LENGTH_35MM: 26}, "exif_35mm", 26.0),
    ],
)
def test_absurd_exif_focal_lengths_fall_back_with_a_note(tags, source, f_35mm):
    decoded = decode_image(png_with_exif(tags))
    assert decoded.focal_length_source == source
    assert decoded.focal_length_px == pytest.approx(f_35mm * 80 / math.hypot(36, 24))


def _gaussians(n: int = 16) -> Gaussians:
    generator = torch.Generator().manual_seed(0)
    return Gaussians(
        means=torch.rand(n, 3, generator=generator) + torch.tensor([0.0, 0.0, 2.0]),
        scales=torch.rand(n, 3, generator=generator) * 0.01 + 0.001,
        quaternions=torch.nn.functional.normalize(torch.rand(n, 4, generator=generator), dim=-1),
        colors=torch.rand(n, 3, generator=generator),
        opacities=torch.linspace(0.05, 0.95, n),
    )


@pytest.mark.parametrize("output_format", ["ply", "spz", "splat", "sog"])
@pytest.mark.parametrize("field", ["means", "scales", "opacities"])
def test_non_finite_values_are_never_encoded(output_format, field):
    gaussians = _gaussians()
    getattr(gaussians, field)[3] = math.nan
    getattr(gaussians, field)[5] = math.inf
    prediction = Prediction(gaussians, 40, 30, 50.0, "override")
    expected = f"prediction holds NaN or infinite values in 2 of 16 Gaussians \\({field}\\)"
    with pytest.raises(NonFiniteError, match=expected):
        encode_prediction(prediction, OutputOptions(format=output_format))


# --- 3. request fields ----------------------------------------------------------------------


def test_fifty_thousand_unknown_fields_get_a_short_answer():
    job_input = {"image": "aGk=", **{f"field{i}": i for i in range(50_000)}}
    with pytest.raises(InputError) as failure:
        parse_request(job_input)
    message = str(failure.value)
    assert "50,000 fields are not valid inputs: field0, field1, field2, field3, field4 and " in (
        message
    )
    assert "49,995 more" in message and len(message) < 1000


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"image": "aGk=", "focal_length_px": 10**400}, "focal_length_px is too large"),
        ({"image": "aGk=", "min_opacity": 10**400}, "min_opacity is too large"),
        ({"image": "aGk=", "min_opacity": -0.5}, "min_opacity must be a number from 0 to 1"),
        ({"image": "aGk=", "max_gaussians": -1}, "max_gaussians must be an integer >= 1, got -1"),
        ({"image": "aGk=", "spz_version": 7}, "spz_version must be one of 2 | 3 | 4, got 7"),
        ({"image": "aGk=", "x" * 10_000: 1}, "x" * 40 + "... is not a valid input"),
    ],
)
def test_out_of_range_fields_name_the_field(job_input, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_request(job_input)


def test_non_ascii_base64_is_the_clients_error():
    with pytest.raises(InputError, match="'é' \\(U\\+00E9\\) at character 4"):
        decode_base64_image("aGVsé8=", 1000)


@pytest.mark.parametrize("size", [1, 2, 3, 299, 300, 301])
def test_the_size_limit_is_exact_for_inline_images(size):
    data = bytes(range(256)) * 2
    text = base64.b64encode(data[:size]).decode()
    assert decode_base64_image(text, size) == data[:size]
    assert decode_base64_image(text.rstrip("="), size) == data[:size]
    with pytest.raises(InputError, match=f"larger than {size - 1:,} bytes"):
        decode_base64_image(text, size - 1)


def test_output_options_own_their_defaults_and_checks():
    assert OutputOptions.given(format=None, min_opacity=0) == OutputOptions(min_opacity=0.0)
    with pytest.raises(ValueError, match="format must be one of ply"):
        OutputOptions(format="obj")
    with pytest.raises(ValueError, match="min_opacity must be a number from 0 to 1, got nan"):
        OutputOptions(min_opacity=math.nan)


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--focal-px", "1e-30"], 1, "--focal-px=1e-30 is out of range for this 400x600 image"),
        (["--focal-px", "inf"], 2, "--focal-px must be a positive number of pixels"),
        (["--min-opacity", "2"], 2, "--min-opacity must be a number from 0 to 1, got 2.0"),
        (["--max-gaussians", "0"], 2, "--max-gaussians must be an integer >= 1, got 0"),
    ],
)
def test_the_cli_names_its_own_flags(flags, code, message, tmp_path):
    result = run_cli(
        "predict", SAMPLE, "-o", tmp_path, "--checkpoint", "tiny-untrained", "--device", "cpu",
        *flags,
    )  # fmt: skip
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


# --- 4. hostile splat files -------------------------------------------------------------------


def _gzip_bomb(header: bytes, inflated_mb: int) -> bytes:
    """`header` followed by `inflated_mb` MB of zeros, as one gzip stream of a few hundred KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(header)]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(inflated_mb)]
    return b"".join(parts) + compressor.flush()


def _webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP header that declares `width` x `height` and holds no pixels."""
    bits = b"\x2f" + ((width - 1) | (height - 1) << 14 | 1 << 28).to_bytes(4, "little")
    bits += bytes(64)
    chunk = b"VP8L" + struct.pack("<I", len(bits)) + bits
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _webp(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def _sog_with(**members: bytes) -> bytes:
    good = write_sog(_gaussians(10))
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
            for name in source.namelist():
                target.writestr(name, members.get(name, source.read(name)))
    return buffer.getvalue()


SPZ = write_spz(_gaussians(1000))
SPZ_HEADER_1000 = gzip.decompress(SPZ)[:16]
HOSTILE_FILES = {
    "truncated.spz": (SPZ[: len(SPZ) // 2], "truncated .spz"),
    "truncated-header.spz": (SPZ[:12], "truncated .spz"),
    "damaged.spz": (SPZ[:20] + bytes(100) + SPZ[120:], "corrupt .spz"),
    "bomb.spz": (_gzip_bomb(SPZ_HEADER_1000, 256), "decompresses to more than the 20,016 bytes"),
    "huge-count.spz": (
        _gzip_bomb(SPZ_HEADER_1000[:8] + struct.pack("<I", 1 << 30) + SPZ_HEADER_1000[12:], 1),
        "declares 1,073,741,824 Gaussians; at most 16,777,216",
    ),
    "webp-16383.sog": (
        _sog_with(**{"sh0.webp": _webp_declaring(16383, 16383)}),
        "sh0.webp is not a readable image",
    ),
    "webp-300.sog": (
        _sog_with(**{"quats.webp": _webp(300, 300)}),
        "quats.webp is not a readable image: not a WebP of at most 65,556 texels",
    ),
    "bomb.sog": (
        _sog_with(**{"scales.webp": bytes(64 << 20)}),
        ".sog member scales.webp is larger than the 393,316 bytes it can hold",
    ),
    "huge-count.sog": (
        _sog_with(**{"meta.json": json.dumps({"version": 2, "count": 1 << 40}).encode()}),
        "count must be from 0 to 16,777,216",
    ),
    "truncated.sog": (write_sog(_gaussians(10))[:-100], "not a .sog file"),
}


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_hostile_files_are_refused_within_bounded_memory(name):
    data, message = HOSTILE_FILES[name]
    reader = read_spz if name.endswith(".spz") else read_sog
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            reader(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes allocated"


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["truncated.spz", "bomb.spz", "webp-16383.sog", "bomb.sog"])
def test_convert_answers_hostile_files_in_one_line(name, tmp_path):
    source = tmp_path / name.split("-")[0].split(".")[0]
    source = source.with_suffix(Path(name).suffix)
    source.write_bytes(HOSTILE_FILES[name][0])
    result = run_cli("convert", source, "-o", tmp_path / "out.ply")
    assert result.returncode == 1
    assert HOSTILE_FILES[name][1] in one_line_error(result)
    assert not (tmp_path / "out.ply").exists()


def test_convert_refuses_a_ply_with_nan(tmp_path):
    from engine.splats.formats import encode

    gaussians = _gaussians()
    gaussians.means[0, 0] = math.nan
    source = tmp_path / "nan.ply"
    source.write_bytes(
        encode(gaussians, "ply", image_width=1, image_height=1, focal_length_px=1).data
    )
    result = run_cli("convert", source, "-o", tmp_path / "out.spz")
    assert result.returncode == 1
    assert "the file holds NaN or infinite values in 1 of 16 Gaussians" in one_line_error(result)


# --- 5. start-up configuration -------------------------------------------------------------


def test_an_unusable_cache_dir_is_named():
    with pytest.raises(SettingsError, match="SHARP_CACHE_DIR='/proc/sharp-cache' is not a"):
        EngineSettings.from_env({"SHARP_CACHE_DIR": "/proc/sharp-cache"})


def test_an_unusable_cache_dir_is_one_line_in_the_cli(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SHARP_CACHE_DIR": "/proc/sharp-cache"}
    result = run_cli("predict", SAMPLE, "-o", tmp_path, env=env)
    assert result.returncode == 2
    assert "SHARP_CACHE_DIR='/proc/sharp-cache' is not a writable folder" in one_line_error(result)


def test_an_unusable_cache_dir_stops_the_worker_in_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SHARP_CACHE_DIR": "/proc/sharp-cache"}
    result = subprocess.run(
        [sys.executable, "-m", "handler"], cwd=REPO, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "SHARP_CACHE_DIR" in line]
    assert "The worker cannot start: SHARP_CACHE_DIR='/proc/sharp-cache'" in line


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    checkpoint = tmp_path / "damaged.pt"
    checkpoint.write_bytes(SAMPLE.read_bytes()[:5000])
    result = run_cli("predict", SAMPLE, "-o", tmp_path, "--checkpoint", checkpoint)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "truncated, damaged or not a PyTorch state dict" in line
    assert "weights_only" not in line


# --- 6. the same classes through the worker's local API (/runsync) ---------------------------

API_TIMEOUT_S = 2.0
EXACT_PNG = png_with_exif({FOCAL_LENGTH: TiffImagePlugin.IFDRational(1, 4_000_000_000)})


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    env = {
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
        "SHARP_URL_TIMEOUT_S": str(API_TIMEOUT_S),
        "SHARP_MAX_IMAGE_BYTES": str(len(EXACT_PNG)),
    }
    with worker_server(env, tmp_path_factory.mktemp("logs") / "hostile.log") as server:
        yield server
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, server.log_tail()


def api_error(api, job_input: object) -> str:
    answer = api.runsync(job_input, timeout=120)
    assert answer["status"] == "FAILED", answer
    assert api.alive(), api.log_tail()
    return answer["error"]


def test_api_exact_size_image_with_absurd_exif_is_a_finite_splat(api):
    job_input = {"image": base64.b64encode(EXACT_PNG).decode(), "max_gaussians": 500}
    answer = api.runsync(job_input)
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["focal_length_source"] == (
        "default (EXIF FocalLength of 2.5e-10 mm ignored as out of range)"
    )
    gaussians = read_ply(base64.b64decode(output["ply"])).gaussians
    assert len(gaussians) == 500
    assert all(bool(torch.isfinite(tensor).all()) for tensor in gaussians.tensors())


IMAGE_B64 = base64.b64encode(PLAIN_PNG).decode()
API_REFUSALS = {
    "focal 1e-30": ({"focal_length_px": 1e-30}, "focal_length_px=1e-30 is out of range"),
    "focal 1e308": ({"focal_length_px": 1e308}, "focal_length_px=1e+308 is out of range"),
    "focal 10**400": ({"focal_length_px": 10**400}, "focal_length_px is too large"),
    "non-ASCII base64": ({"image": "aGVsbG8é"}, "image is not valid base64"),
    "one byte over": (
        {"image": base64.b64encode(EXACT_PNG + b"\0").decode()},
        f"the image is larger than {len(EXACT_PNG):,} bytes",
    ),
    "long label": (
        {"image": None, "image_url": f"http://{'a' * 64}.example.com/a.jpg"},
        "a label of 64 characters",
    ),
    "unknown fields": (
        {f"field{i}": i for i in range(50_000)},
        "50,000 fields are not valid inputs: field0, field1, field2, field3, field4 and 49,995",
    ),
}


@pytest.mark.parametrize("name", API_REFUSALS)
def test_api_refuses_clearly(api, name):
    fields, message = API_REFUSALS[name]
    job_input = {k: v for k, v in {"image": IMAGE_B64, **fields}.items() if v is not None}
    error = api_error(api, job_input)
    assert message in error
    assert len(error) < 1000


@pytest.mark.parametrize("script", [_headers_dripping, _endless_continue, _chunk_size_byte_by_byte])
def test_api_cuts_off_a_slow_image_url(api, script):
    with raw_server(script()) as port:
        start = time.monotonic()
        error = api_error(api, {"image_url": f"http://127.0.0.1:{port}/a.jpg"})
        elapsed = time.monotonic() - start
    assert "longer than 2 s, the limit on the whole download (SHARP_URL_TIMEOUT_S)" in error
    assert elapsed < API_TIMEOUT_S + 5  # the deadline, plus a busy machine's HTTP round trip
