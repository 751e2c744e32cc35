"""Every user-facing output, end to end, read back by readers that are not ours.

For each format in engine.splats.formats.FORMATS, unpruned and pruned:
  * the installed `sharp-runpod predict` console script writes the file (a subprocess), and a
    /runsync job on the RunPod SDK's local API server (`python -m handler --rp_serve_api`)
    returns it (inline, or through a bucket: moto's S3 server); the two are the same bytes;
  * PlayCanvas's splat-transform reads it: the right number of Gaussians, and per-column
    statistics equal to those of the .ply of the same image within the format's quantization;
  * plyfile reads the .ply, and the project's readers read every format, each equal to the
    pipeline's own prediction of the image (computed here, in this process) within the
    format's quantization;
  * Spark, a real three.js viewer, renders the .ply, .spz and .sog in headless Chromium from
    the capture camera, and the frame is the photo the right way up.

The pipeline's tensors are strided views, and a writer that assumes contiguous memory writes
garbage only for them: these tests use the real pipeline, and a unit test feeds each writer
strided tensors directly. Every file is computed once per module; the model costs seconds of
CPU per image, and Spark on SwiftShader about half a minute per million Gaussians.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import viewers
from handler_support import SAMPLE, WorkerServer, http_get, moto_s3, worker_server
from PIL import Image, ImageOps

from engine.io.images import decode_image
from engine.network.color import linear_to_srgb
from engine.runtime.predictor import Prediction, SharpPredictor
from engine.splats.formats import FORMATS, encode
from engine.splats.formats.ply import VERTEX_PROPERTIES, read_ply, vertex_rows
from engine.splats.formats.splat import read_splat
from engine.splats.formats.spz import read_spz
from engine.splats.gaussians import Gaussians
from engine.splats.pruning import prune

IMAGE = SAMPLE.read_bytes()
UNPRUNED_COUNT = 1_179_648  # 2 layers x 768 x 768 for any image
SH_C0 = 0.28209479177387814
# Pruning exercises both options: an opacity floor, then the most important of what is left.
PRUNINGS: dict[str, dict[str, Any]] = {
    "unpruned": {},
    "pruned": {"max_gaussians": 50_000, "min_opacity": 0.45},
}
CASES = [pytest.param(f, p, id=f"{f}-{p}") for f in FORMATS for p in PRUNINGS]
COMPACT_CASES = [pytest.param(f, p, id=f"{f}-{p}") for f in FORMATS if f != "ply" for p in PRUNINGS]
# Spark renders these (unpruned) from the capture camera; .splat is read by splat-transform
# and by our reader, and shares the .ply's axes.
RENDERED = [f for f in ("ply", "spz", "sog") if f in FORMATS]
RENDER_SIZE = (200, 300)  # width, height: the photo's 2:3, downscaled

# Delivery through the SDK server: the unpruned .ply (66 MB) through the bucket, as a client
# without a large inline limit would get it; everything else inline.
BUCKET = "sharp-e2e"


def job_delivery(format: str, pruning: str) -> str:
    return "url" if (format, pruning) == ("ply", "unpruned") else "inline"


# --- what the pipeline itself predicts ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Prediction:
    """The engine's prediction for the sample in this process (the model is deterministic)."""
    predictor = SharpPredictor.from_checkpoint("tiny-untrained", device="cpu")
    prediction = predictor.predict(decode_image(IMAGE))
    assert len(prediction.gaussians) == UNPRUNED_COUNT
    return prediction


@pytest.fixture(scope="module")
def expected(reference: Prediction) -> dict[str, Gaussians]:
    """pruning name -> the Gaussians its file must hold, in file order (for .splat: any order)."""
    return {
        name: prune(reference.gaussians, focal_length_px=reference.focal_length_px, **options)
        if options
        else reference.gaussians
        for name, options in PRUNINGS.items()
    }


# --- the files, as users get them --------------------------------------------------------------


def cli_command() -> list[str]:
    """The console script pip installed beside this interpreter: what users run."""
    script = Path(sys.executable).with_name("sharp-runpod")
    if not script.is_file():
        pytest.fail(f"{script} is missing: the project is not installed (make .venv/.installed)")
    return [str(script)]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "BUCKET_", "RUNPOD_"))
    }
    return {**env, **extra}


@dataclass
class Outputs:
    """Each (format, pruning)'s file from the CLI and from a /runsync job, made on first use.

    Jobs go to the server the test passes, so tests of CLI files alone do not start one.
    """

    folder: Path

    def __post_init__(self) -> None:
        self._cli: dict[tuple[str, str], Path] = {}
        self._job: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
        self._stats: dict[Path, dict[str, Any]] = {}

    def cli(self, format: str, pruning: str) -> Path:
        key = (format, pruning)
        if key not in self._cli:
            out = self.folder / "cli" / f"{format}-{pruning}"
            flags = []
            for option, value in PRUNINGS[pruning].items():
                flags += [f"--{option.replace('_', '-')}", str(value)]
            command = [
                *cli_command(), "predict", str(SAMPLE), "-o", str(out),
                "--checkpoint", "tiny-untrained", "--device", "cpu", "--format", format, *flags,
            ]  # fmt: skip
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=900, env=clean_env()
            )
            assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
            path = out / f"{SAMPLE.stem}.{format}"
            assert path.is_file(), f"the CLI wrote {sorted(out.iterdir())}, not {path.name}"
            self._cli[key] = path
        return self._cli[key]

    def job(self, server: WorkerServer, format: str, pruning: str) -> tuple[Path, dict[str, Any]]:
        """The job's file (decoded or downloaded) and its output fields less the payload."""
        key = (format, pruning)
        if key not in self._job:
            delivery = job_delivery(format, pruning)
            job_input = {
                "image": base64.b64encode(IMAGE).decode(),
                "output_format": format,
                **PRUNINGS[pruning],
            }
            if delivery == "url":
                job_input["return"] = "url"
            answer = server.runsync(job_input)
            assert answer.get("status") == "COMPLETED", (answer, server.log_tail())
            output = answer["output"]
            assert output["delivery"] == delivery, output.keys()
            if delivery == "url":
                data = http_get(output.pop(f"{format}_url"))
            else:
                data = base64.b64decode(output.pop(format))
            path = self.folder / "job" / f"{format}-{pruning}" / f"{SAMPLE.stem}.{format}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self._job[key] = (path, output)
        return self._job[key]

    def stats(self, path: Path) -> dict[str, Any]:
        if path not in self._stats:
            self._stats[path] = viewers.splat_transform_read(path)
        return self._stats[path]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One SDK server for every job: a bucket, and an inline limit above any pruned result."""
    with moto_s3(BUCKET) as bucket_env:
        env = {"SHARP_MAX_INLINE_BYTES": "200000000", **bucket_env}
        log = tmp_path_factory.mktemp("e2e-logs") / "worker.log"
        with worker_server(env, log) as server:
            yield server


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Outputs:
    return Outputs(tmp_path_factory.mktemp("e2e"))


# --- 1. one encoder: the CLI and the worker give the same bytes --------------------------------


@pytest.mark.parametrize("format, pruning", CASES)
def test_cli_file_and_runsync_result_are_the_same_bytes(outputs, worker, expected, format, pruning):
    cli = outputs.cli(format, pruning).read_bytes()
    job_path, output = outputs.job(worker, format, pruning)
    assert output["status"] == "success" and output["format"] == format
    assert output["num_gaussians"] == len(expected[pruning])
    assert output["num_gaussians_predicted"] == UNPRUNED_COUNT
    assert output["size_bytes"] == len(cli)
    assert job_path.read_bytes() == cli, "the CLI and the worker encoded differently"


# --- 2. splat-transform reads every file -------------------------------------------------------


@pytest.mark.parametrize("format, pruning", CASES)
def test_splat_transform_reads_every_gaussian(outputs, expected, format, pruning):
    stats = outputs.stats(outputs.cli(format, pruning))
    count = len(expected[pruning])  # UNPRUNED_COUNT unpruned (the reference fixture checks)
    assert (stats["format"], stats["count"], stats["sh_bands"]) == (format, count, 0)
    assert set(stats["columns"]) == set(VERTEX_PROPERTIES)
    for name, column in stats["columns"].items():
        assert column["nanCount"] == 0 and column["infCount"] == 0, (name, column)


# --- 3. plyfile and the project's readers give back the prediction ----------------------------


@pytest.mark.parametrize("pruning", PRUNINGS)
def test_plyfile_reads_the_prediction(outputs, expected, pruning):
    plyfile = pytest.importorskip("plyfile")
    ply = plyfile.PlyData.read(io.BytesIO(outputs.cli("ply", pruning).read_bytes()))
    assert [e.name for e in ply.elements] == ["vertex"]  # the standard layout
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == list(VERTEX_PROPERTIES)
    assert vertex.count == len(expected[pruning])
    stored = np.stack([np.asarray(vertex[name]) for name in VERTEX_PROPERTIES], axis=1)
    np.testing.assert_allclose(stored, vertex_rows(expected[pruning]).numpy(), rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Bounds:
    """Largest per-Gaussian errors a format's quantization allows, in decoded units."""

    position: np.ndarray | float  # metres, per axis or for all
    log_scale: float  # natural log of the scales
    srgb: float  # stored sRGB colour, 0..1
    opacity: float  # 0..1
    rotation: float  # 1 - |<q, q'>| of the unit quaternions
    rotation_component: float | None  # per component of (w, x, y, z), when the sign is kept
    sh0: float  # the .ply's f_dc (degree-0 SH coefficient of sRGB)


SLACK = 1e-5  # float32 arithmetic on values of order 1 (the CLI and this process share code)


def sog_meta(data: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return json.loads(archive.read("meta.json"))


def spz_version(data: bytes) -> int:
    """The version field of an .spz header (inside the gzip stream for versions 1-3)."""
    if data[:2] == b"\x1f\x8b":
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 16)
    return int.from_bytes(data[4:8], "little")


def half_gap(codebook: list[float]) -> float:
    values = np.sort(np.asarray(codebook, dtype=np.float64))
    return float(np.diff(values).max()) / 2


def bounds_for(
    format: str, data: bytes, means: np.ndarray, gaussians: Gaussians | None = None
) -> Bounds:
    """Each format's quantization, as its module docstring states it (and the file's own
    ranges and codebooks, and for .sog the precision level meta.json states: then
    `gaussians`, the file's, are needed)."""
    byte = 0.5 / 255
    if format == "ply":
        return Bounds(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if format == "splat":
        # Exact float32 positions and scales; colours, alpha and (q * 128 + 128) in bytes, a
        # component of +1 saturating at 255 (one full step).
        return Bounds(0.0, 0.0, byte, byte, 2e-4, 1 / 128, byte / SH_C0)
    if format == "spz":
        # 12 fraction bits, log scales in 1/16 steps, colours as sh0 * 0.15 * 255 + 127.5,
        # alpha * 255; rotations as "smallest three" in 9 bits (sign made positive).
        # Version 2 stores x, y, z in 8 bits and rebuilds w = sqrt(1 - |xyz|^2), which
        # amplifies their error where w is small.
        sh0 = 0.5 / (0.15 * 255)
        rotation = 1e-2 if spz_version(data) == 2 else 1e-5
        return Bounds(0.5 / 4096, 1 / 32, SH_C0 * sh0, byte, rotation, None, sh0)
    if format == "sog":
        meta = sog_meta(data)
        lo, hi = np.asarray(meta["means"]["mins"]), np.asarray(meta["means"]["maxs"])
        step = (hi - lo) / 65535
        # Symmetric log positions in 16 bits: |p error| <= (1 + |p|) step / 2 (1 + step).
        p = np.abs(means).max(axis=0)
        position = (1 + p) * step / 2 * (1 + step)
        sh0 = half_gap(meta["sh0"]["codebook"])
        log_scale, rotation = half_gap(meta["scales"]["codebook"]), 1e-4
        level = re.search(r"precision level (\d+)", meta["asset"]["generator"])
        if level is not None:  # held to what a viewer sees: engine.splats.formats.sog_precision
            tolerance, log_scale, sh0 = sog_tolerances(gaussians, int(level[1]), log_scale, sh0)
            position = np.maximum(position, tolerance * (1 + 1e-3))
            rotation = 1.0  # near-isotropic Gaussians keep no rotation: see the render tests
        # Rotations: "smallest three" in 8 bits of c * sqrt2 / 2 + 1 / 2.
        return Bounds(position, log_scale, SH_C0 * sh0, byte, rotation, None, sh0)
    pytest.fail(f"no quantization bounds for format {format!r}: add them to bounds_for")


def sog_tolerances(
    g: Gaussians, level: int, half_scale_gap: float, half_sh0_gap: float
) -> tuple[float, float, float]:
    """The largest position error (metres), log-scale and sh0 error a .sog at this precision
    level allows for any of these Gaussians (engine.splats.formats.sog_precision), with the
    coffee sample's focal length (its camera, 433.33 px; 433.3 for the strided sets)."""
    from engine.splats.formats import sog_precision

    tolerance = sog_precision.spatial_tolerance(g.contiguous(), focal_length_px=433.3, level=level)
    log_scale = max(half_scale_gap, float((tolerance[:, None] / (2 * g.scales)).max()))
    colour = float(sog_precision.color_allowance(g.opacities, level).max())
    return float(tolerance.max()), log_scale * (1 + 1e-3), max(half_sh0_gap, colour)


def project_reader(format: str) -> Callable[[bytes], Gaussians]:
    if format == "ply":
        return lambda data: read_ply(data).gaussians
    if format == "spz":
        return read_spz
    if format == "splat":
        return read_splat
    if format == "sog":
        from engine.splats.formats.sog_reader import read_sog

        return read_sog
    pytest.fail(f"no reader for format {format!r}: add it to project_reader")


def unit(q: torch.Tensor) -> np.ndarray:
    q = q.double().numpy()
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def by_position(g: Gaussians) -> Gaussians:
    """The Gaussians in lexicographic (x, y, z) order: to compare a file that reorders them."""
    m = g.means.numpy()
    return g.index(torch.from_numpy(np.lexsort((m[:, 2], m[:, 1], m[:, 0]))))


def assert_within(name: str, actual: np.ndarray, desired: np.ndarray, bound: Any) -> None:
    error = np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64))
    limit = np.asarray(bound, np.float64) + SLACK
    worst = np.unravel_index(np.argmax(error - limit), error.shape)
    assert (error <= limit).all(), (
        f"{name}: {int((error > limit).sum())} values beyond the bound {bound}; worst at "
        f"{worst}: {np.asarray(actual)[worst]} for {np.asarray(desired)[worst]}"
    )


@pytest.mark.parametrize("format, pruning", CASES)
def test_project_reader_gives_back_the_prediction(outputs, expected, format, pruning):
    data = outputs.cli(format, pruning).read_bytes()
    want = expected[pruning]
    got = project_reader(format)(data)
    assert len(got) == len(want)
    if format == "splat":  # rows are sorted by importance; positions are exact
        got, want = by_position(got), by_position(want)
    bounds = bounds_for(format, data, want.means.numpy(), want)
    assert_within("means", got.means.numpy(), want.means.numpy(), bounds.position)
    assert_within(
        "log scales", got.scales.log().numpy(), want.scales.log().numpy(), bounds.log_scale
    )
    assert_within(
        "sRGB colours",
        linear_to_srgb(got.colors).numpy(),
        linear_to_srgb(want.colors).numpy(),
        bounds.srgb + 1e-4,  # the linear <-> sRGB round trip in float32
    )
    assert_within("opacities", got.opacities.numpy(), want.opacities.numpy(), bounds.opacity + 1e-5)
    # A quaternion and its negation are one rotation; .spz and .sog store either.
    alignment = np.abs((unit(got.quaternions) * unit(want.quaternions)).sum(axis=1))
    assert_within(
        "rotations (1 - |<q, q'>|)", 1 - alignment, np.zeros_like(alignment), bounds.rotation
    )


# --- 4. splat-transform sees the same scene in every format ------------------------------------

# splat-transform's JSON statistics show some columns in "display" units: the transform is
# applied to min, max, median, mean and stdDev alike. Undone here, so every statistic is in
# the .ply's stored units, where a per-Gaussian error bound e bounds each statistic's change
# by e (order statistics, means and standard deviations are 1-Lipschitz in the max norm).
_STORED = {
    "scale": math.log,
    "opacity": lambda p: math.log(p / (1 - p)),
    "f_dc": lambda c: (c - 0.5) / SH_C0,
}
STATISTICS = ("min", "max", "median", "mean", "stdDev")


def stored_units(column: str, value: float) -> float:
    for prefix, inverse in _STORED.items():
        if column.startswith(prefix):
            return inverse(value)
    return value


def stored_bound(
    format: str, column: str, bounds: Bounds, ply_column: dict[str, float]
) -> float | None:
    """The error bound of one column in the .ply's stored units; None: not comparable."""
    if column in ("x", "y", "z"):
        return float(np.max(np.broadcast_to(bounds.position, 3)["xyz".index(column)]))
    if column.startswith("scale"):
        return bounds.log_scale
    if column.startswith("f_dc"):
        return bounds.sh0
    if column == "opacity":  # alpha error through the logit: slope 1 / (p (1 - p))
        lo, hi = ply_column["min"] - bounds.opacity, ply_column["max"] + bounds.opacity
        return bounds.opacity / min(lo * (1 - lo), hi * (1 - hi))
    if column.startswith("rot"):
        return bounds.rotation_component  # None where the file may negate a quaternion
    raise AssertionError(column)


# .spz stores RUB axes: (x, -y, -z) of the .ply's OpenCV axes; splat-transform converts none.
AXIS_SIGNS = {"spz": {"y": -1, "z": -1}}


@pytest.mark.parametrize("format, pruning", COMPACT_CASES)
def test_splat_transform_statistics_match_the_ply(outputs, expected, format, pruning):
    ply = outputs.stats(outputs.cli("ply", pruning))["columns"]
    path = outputs.cli(format, pruning)
    compact = outputs.stats(path)["columns"]
    bounds = bounds_for(
        format, path.read_bytes(), expected[pruning].means.numpy(), expected[pruning]
    )
    signs = AXIS_SIGNS.get(format, {})
    compared = []
    for name in VERTEX_PROPERTIES:
        raw_ply = {key: stored_units(name, ply[name][key]) for key in STATISTICS}
        raw = {key: stored_units(name, compact[name][key]) for key in STATISTICS}
        bound = stored_bound(format, name, bounds, ply[name])
        if bound is None:
            continue
        if signs.get(name, 1) < 0:  # negated axis: min <-> -max
            raw = {
                "min": -raw["max"], "max": -raw["min"], "median": -raw["median"],
                "mean": -raw["mean"], "stdDev": raw["stdDev"],
            }  # fmt: skip
        span = raw_ply["max"] - raw_ply["min"]
        for key in STATISTICS:
            # Medians are approximate (a 1024-bin histogram over the column's range), and the
            # JSON keeps 6 significant digits.
            limit = (
                bound + 1e-5 * (1 + abs(raw_ply[key])) + (2 * span / 1024 if key == "median" else 0)
            )
            assert abs(raw[key] - raw_ply[key]) <= limit, (
                f"{format} {name} {key}: {raw[key]} vs the .ply's {raw_ply[key]} (limit {limit})"
            )
        compared.append(name)
    assert {"x", "y", "z", "opacity", "scale_0", "f_dc_0"} <= set(compared)


# --- 5. a real viewer shows the photo, upright -------------------------------------------------


def photo_gray(size: tuple[int, int]) -> np.ndarray:
    upright = ImageOps.exif_transpose(Image.open(SAMPLE)).convert("L")
    return np.asarray(upright.resize(size, Image.Resampling.BOX), np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def gray(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def renders(outputs, reference, tmp_path_factory) -> Callable[[str], np.ndarray]:
    """format -> Spark's frame of its unpruned file from the capture camera (made once).

    The PNGs stay in the test's temporary folder; SHARP_E2E_RENDERS=DIR keeps copies there.
    """
    folder = Path(os.environ.get("SHARP_E2E_RENDERS") or tmp_path_factory.mktemp("renders"))
    made: dict[str, np.ndarray] = {}
    fovy = viewers.vertical_fov_deg(reference.focal_length_px, reference.image_height)

    def render(format: str) -> np.ndarray:
        if format not in made:
            width, height = RENDER_SIZE
            made[format] = viewers.render_in_spark(
                outputs.cli(format, "unpruned"),
                width=width,
                height=height,
                fovy_deg=fovy,
                pose=viewers.CAPTURE_POSE[format],
                save_to=folder / f"spark-{format}.png",
            )
        return made[format]

    return render


@pytest.mark.parametrize("format", RENDERED)
def test_spark_shows_the_photo_upright(renders, format):
    """The untrained model's Gaussians take their colours from the photo's pixels (plus small
    deltas) and sit on the camera rays through them, so seen from the capture camera the
    splat is the photo: far more like it than like the photo upside down."""
    frame = renders(format)
    assert frame.shape == (RENDER_SIZE[1], RENDER_SIZE[0], 3)
    covered = (frame.max(axis=2) > 0).mean()
    assert covered > 0.98, f"{format}: only {covered:.1%} of the frame shows splats"
    photo = photo_gray(RENDER_SIZE)
    upright = correlation(gray(frame), photo)
    # The photo upside down, mirrored, and turned half a turn (a camera rolled by pi).
    wrong = {
        "flipped": correlation(gray(frame), photo[::-1]),
        "mirrored": correlation(gray(frame), photo[:, ::-1]),
        "turned": correlation(gray(frame), photo[::-1, ::-1]),
    }
    assert upright > 0.9, f"{format}: the frame does not look like the photo (r = {upright:.3f})"
    assert upright > max(wrong.values()) + 0.3, (format, upright, wrong)


@pytest.mark.parametrize("format", [f for f in RENDERED if f != "ply"])
def test_spark_shows_every_format_as_the_ply(renders, format):
    """Same camera, same scene: the compact file's frame is the .ply's, up to quantization."""
    assert correlation(gray(renders(format)), gray(renders("ply"))) > 0.95


# --- 6. writers accept the pipeline's strided tensors ------------------------------------------


def strided_gaussians(n: int = 4099, seed: int = 0) -> Gaussians:
    """Gaussians whose tensors are all non-contiguous, as the pipeline's are: columns of one
    (N, 17) row block, and transposed (column-major) layouts."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.tensor([-1.0, -1.5, 2.0] + [-6.5] * 3 + [-1.0] * 4 + [0.0] * 4 + [0.0] * 3)
    width = torch.tensor([2.0, 3.0, 0.3] + [5.0] * 3 + [2.0] * 4 + [1.0] * 4 + [1.0] * 3)
    rows = torch.rand(n, 17, generator=generator) * width + low  # (N, 17), row-major
    rows[:, 3:6] = rows[:, 3:6].exp()
    means = rows[:, 0:3]  # strided columns
    scales = rows[:, 3:6].t().contiguous().t()  # column-major
    quaternions = rows[:, 6:10]
    colors = rows[:, 10:13].t().contiguous().t()
    opacities = rows[:, 13]  # stride 17
    g = Gaussians(means, scales, quaternions, colors, opacities)
    for name in FIELDS:
        assert not getattr(g, name).is_contiguous(), name
    return g


FIELDS = ("means", "scales", "quaternions", "colors", "opacities")


def contiguous(g: Gaussians) -> Gaussians:
    return Gaussians(**{name: getattr(g, name).contiguous().clone() for name in FIELDS})


def encodings(g: Gaussians, format: str) -> dict[str, bytes]:
    """Every variant of one format a user can ask for: .ply layouts, .spz versions."""
    options = {"image_width": 400, "image_height": 600, "focal_length_px": 433.3}
    variants: dict[str, dict[str, Any]] = {"default": {}}
    if format == "ply":
        variants = {layout: {"ply_layout": layout} for layout in ("standard", "sharp")}
    elif format == "spz":
        variants = {f"v{v}": {"spz_version": v} for v in (2, 3, 4)}
    return {
        name: encode(g, format, **options, **variant).data for name, variant in variants.items()
    }


@pytest.mark.parametrize("format", FORMATS)
def test_writers_give_the_same_bytes_for_strided_tensors(format):
    strided = strided_gaussians()
    assert encodings(strided, format) == encodings(contiguous(strided), format)


@pytest.mark.parametrize("format", FORMATS)
def test_writers_encode_strided_tensors_right(format):
    """The bytes from strided tensors decode to those Gaussians, not to a scrambled copy."""
    strided = strided_gaussians()
    for variant, data in encodings(strided, format).items():
        got = project_reader(format)(data)
        want = strided
        if format == "splat":
            got, want = by_position(got), by_position(want)
        bounds = bounds_for(format, data, want.means.numpy(), want)
        name = f"{format} {variant}"
        assert_within(f"{name} means", got.means.numpy(), want.means.numpy(), bounds.position)
        assert_within(
            f"{name} log scales",
            got.scales.log().numpy(),
            want.scales.log().numpy(),
            bounds.log_scale,
        )
        assert_within(
            f"{name} sRGB colours",
            linear_to_srgb(got.colors).numpy(),
            linear_to_srgb(want.colors).numpy(),
            bounds.srgb + 1e-4,
        )
        assert_within(
            f"{name} opacities",
            got.opacities.numpy(),
            want.opacities.numpy(),
            bounds.opacity + 1e-5,
        )
        alignment = np.abs((unit(got.quaternions) * unit(want.quaternions)).sum(axis=1))
        assert_within(f"{name} rotations", 1 - alignment, np.zeros_like(alignment), bounds.rotation)


# --- the tools are the ones the lock file pins --------------------------------------------------


def test_viewer_tools_are_the_pinned_versions():
    """node_modules holds what tests/js/package.json pins (make reinstalls on a change)."""
    viewers.require_splat_transform()
    pinned = json.loads((viewers.JS_DIR / "package.json").read_text())["dependencies"]
    installed = {package: viewers.npm_package_version(package) for package in pinned}
    assert installed == pinned
    assert viewers.splat_transform_version() == pinned["@playcanvas/splat-transform"]
