"""The worker's HTTP mode, as a load-balancing endpoint runs it: `SHARP_SERVE=http python -m
handler`, a real uvicorn server on 127.0.0.1 with the tiny model on the CPU, called over HTTP.

Raw-image and JSON requests come back as files that splat-transform reads, byte for byte the
queue worker's result for the same input; every class of error has its status and message;
load past the queue bound is turned away at once; the page shows a photo's splat in Spark in
headless Chromium; `sharp-runpod view` shows a file the same way. Each request that runs the
model costs seconds of CPU, so they are few and each result serves several checks.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import viewers
from handler_support import REPO, SAMPLE, FailingPredictor, http_get, moto_s3, png_bytes
from http_support import Answer, HttpServer, http_server, request
from PIL import Image, ImageOps
from starlette.testclient import TestClient

from engine.runtime.predictor import SharpPredictor
from engine.settings import Settings
from engine.viewer import PINNED, import_map
from handler.web.app import ServerState, create_app
from handler.web.requests import wants_json
from handler.worker import SharpWorker

IMAGE = SAMPLE.read_bytes()
IMAGE_B64 = base64.b64encode(IMAGE).decode()
UNPRUNED_COUNT = 1_179_648
PRUNED = {"max_gaussians": 50_000, "min_opacity": 0.45}
PRUNED_QUERY = "max_gaussians=50000&min_opacity=0.45"
JPEG = {"Content-Type": "image/jpeg"}
JSON = {"Content-Type": "application/json"}
MAX_IMAGE_BYTES = 2_000_000
BUCKET = "sharp-http"
PAGE_SIZE = (200, 300)  # the photo's 2:3


@pytest.fixture(scope="module")
def bucket_env():
    with moto_s3(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def server(tmp_path_factory, bucket_env):
    env = {
        "SHARP_MAX_QUEUED": "1",
        "SHARP_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "SHARP_VIEWER_MODULES": str(viewers.NODE_MODULES),
        **bucket_env,
    }
    with http_server(env, tmp_path_factory.mktemp("logs") / "http.log") as running:
        yield running


@pytest.fixture(scope="module")
def queue_worker():
    """The queue worker, as the RunPod SDK calls it, on the same model (deterministic)."""
    env = {"SHARP_CHECKPOINT": "tiny-untrained", "SHARP_DEVICE": "cpu"}
    settings = Settings.from_env({**env, "SHARP_MAX_INLINE_BYTES": "200000000"})
    worker = SharpWorker(settings, SharpPredictor.from_settings(settings.engine), None)
    return lambda job_input: worker({"id": "queue", "input": job_input})


class Results:
    """Each raw request's answer, made once: name -> (format, query)."""

    CASES = {
        "sog-unpruned": ("sog", ""),
        "spz-unpruned": ("spz", ""),
        "splat-pruned": ("splat", PRUNED_QUERY),
        "ply-pruned": ("ply", PRUNED_QUERY),
    }

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.answers: dict[str, Answer] = {}

    def query(self, name: str) -> str:
        format, options = self.CASES[name]
        return f"?output_format={format}" + (f"&{options}" if options else "")

    def get(self, name: str) -> Answer:
        if name not in self.answers:
            self.answers[name] = self.server.predict(IMAGE, self.query(name), **JPEG)
        return self.answers[name]


@pytest.fixture(scope="module")
def results(server) -> Results:
    return Results(server)


def error_of(answer: Answer, status: int, *fragments: str) -> str:
    assert answer.status == status, (answer.status, answer.body[:500])
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    for fragment in fragments:
        assert fragment in error, error
    assert "Traceback" not in error and 'File "' not in error
    return error


# --- 1. starting: the port opens first, the model loads behind it --------------------------------


def test_ping_answers_204_while_loading_then_200(server):
    statuses = [status for _, status, _ in server.pings]
    assert statuses[-1] == 200 and 204 in statuses, statuses
    assert set(statuses[:-1]) == {204}, statuses
    assert all(body == b"" for _, status, body in server.pings if status == 204)
    assert "Invalid HTTP" not in server.log_text() and "Response content" not in server.log_text()


def test_predict_while_loading_is_503_with_retry_after(server):
    answer = server.predict_while_loading
    assert answer is not None, "the model loaded before the first /ping"
    error_of(answer, 503, "still loading")
    assert int(answer.headers["retry-after"]) > 0


# --- 2. overload: one on the model, SHARP_MAX_QUEUED waiting, the rest turned away at once ------


def test_load_past_the_bound_is_turned_away_at_once(server, results):
    name = "sog-unpruned"
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(server.predict, IMAGE, results.query(name), **JPEG)
        time.sleep(2)  # the first is on the model now: the image decodes in milliseconds
        waiting = pool.submit(server.predict, IMAGE, "?output_format=obj", **JPEG)
        time.sleep(1)
        start = time.monotonic()
        turned_away = [server.predict(IMAGE, results.query(name), **JPEG) for _ in range(3)]
        elapsed = time.monotonic() - start
        for answer in turned_away:
            error_of(answer, 429, "busy", "SHARP_MAX_QUEUED")
            assert int(answer.headers["retry-after"]) >= 1
        assert elapsed < 10, f"turning 3 requests away took {elapsed:.1f} s"
        assert not running.done(), "the first request ended before the check"
        error_of(waiting.result(), 422, "output_format")  # waited its turn, then refused
        results.answers[name] = running.result()
    assert results.answers[name].status == 200


# --- 3. raw requests in every format, read back by splat-transform --------------------------------


@pytest.mark.parametrize("name", Results.CASES)
def test_raw_request_answers_the_file(results, name, tmp_path):
    format = Results.CASES[name][0]
    answer = results.get(name)
    assert answer.status == 200, answer.body[:500]
    headers = answer.headers
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == f'inline; filename="splat.{format}"'
    assert headers["x-sharp-format"] == format
    assert int(headers["x-sharp-size-bytes"]) == len(answer.body)
    count = int(headers["x-sharp-num-gaussians"])
    assert int(headers["x-sharp-num-gaussians-predicted"]) == UNPRUNED_COUNT
    assert count == UNPRUNED_COUNT if name.endswith("unpruned") else 0 < count <= 50_000
    assert (headers["x-sharp-image-size-width"], headers["x-sharp-image-size-height"]) == (
        "400",
        "600",
    )
    assert float(headers["x-sharp-focal-length-px"]) > 0
    assert (headers["x-sharp-backend"], headers["x-sharp-precision"]) == ("eager", "fp32")
    assert "inference;dur=" in headers["server-timing"]
    path = tmp_path / f"splat.{format}"
    path.write_bytes(answer.body)
    assert viewers.splat_transform_read(path)["count"] == count


def test_raw_result_is_the_queue_workers_bytes(results, queue_worker):
    queued = queue_worker({"image": IMAGE_B64, "output_format": "sog"})
    assert queued["status"] == "success", queued
    assert results.get("sog-unpruned").body == base64.b64decode(queued["sog"])


@pytest.fixture(scope="module")
def queued_pruned(queue_worker) -> dict[str, Any]:
    return queue_worker({"image": IMAGE_B64, "output_format": "sog", **PRUNED})


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    """The result less what depends on the way in: timings, and the .sog's byte budget (the
    queue's inline limit or the response's), which is reported, not compared."""
    kept = {key: value for key, value in result.items() if key != "timings_ms"}
    if "sog_encoding" in kept:
        kept["sog_encoding"] = {
            k: v for k, v in kept["sog_encoding"].items() if k != "budget_bytes"
        }
    return kept


def test_json_answer_is_the_queue_workers_result(server, queued_pruned):
    """A raw body with options in the query, and ?response=json: the queue's result, as JSON."""
    answer = server.predict(IMAGE, f"?output_format=sog&{PRUNED_QUERY}&response=json", **JPEG)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert without_timings(answer.json()) == without_timings(queued_pruned)


def test_queue_json_input_answers_the_same_file(server, queued_pruned):
    job = {"input": {"image": IMAGE_B64, "output_format": "sog", **PRUNED}}
    answer = server.predict(json.dumps(job).encode(), **JSON)
    assert answer.status == 200 and answer.headers["content-type"] == "application/octet-stream"
    assert answer.body == base64.b64decode(queued_pruned["sog"])


def test_json_is_asked_for_by_accept_or_the_query():
    assert wants_json("application/json", [])
    assert wants_json("text/html, application/json;q=0.9", [])
    assert not wants_json("*/*", []) and not wants_json("", [])
    assert wants_json("*/*", [("response", "json")])
    assert not wants_json("application/json", [("response", "file")])


# --- 4. what does not fit in a response -------------------------------------------------------------


def test_full_ply_is_refused_inline_with_what_to_ask_instead(server):
    answer = server.predict(IMAGE, "?output_format=ply&return=inline", **JPEG)
    error = error_of(answer, 422, "66,060,", "response limit of 30,000,000 bytes")
    assert error.index('output_format: "sog"') < error.index("return='url'")


def test_full_ply_goes_through_the_bucket(server, bucket_env):
    answer = server.predict(IMAGE, "?output_format=ply", **JPEG)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    result = answer.json()
    assert result["delivery"] == "url" and "ply" not in result
    assert result["ply_url"].startswith(f"{bucket_env['BUCKET_ENDPOINT_URL']}/{BUCKET}/sharp/http-")
    ply = http_get(result["ply_url"])
    assert len(ply) == result["size_bytes"] > 30_000_000
    assert f"element vertex {UNPRUNED_COUNT}\n".encode() in ply[:1000]


# --- 5. every class of error, and the worker still serves --------------------------------------------


def ico_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="ICO")
    return buffer.getvalue()


def job(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# name -> (body, query, headers, status, fragments)
ERRORS: dict[str, tuple[Any, str, dict[str, str], int, list[str]]] = {
    "not an image": (b"just some text", "", JPEG, 415, ["not an image in a supported format"]),
    "unsupported image type": (ico_bytes, "", {}, 415, ["unsupported image format 'ICO'"]),
    "multipart form": (b"--x\r\n", "", {"Content-Type": "multipart/form-data; boundary=x"}, 415, ["multipart"]),
    "too many pixels": (
        lambda: png_bytes(7000, 6000, mode="1"), "", {}, 413, ["above the limit of 40,000,000"]
    ),
    "image over the limit": (bytes(MAX_IMAGE_BYTES + 1), "", JPEG, 413, ["larger than 2,000,000"]),
    "JSON over the body limit": (
        lambda: job(image="A" * 30_000_000), "", JSON, 413, ["larger than 30,000,000 bytes"]
    ),
    "no image": (b"", "?output_format=sog", {}, 422, ["no image given"]),
    "unknown option": (IMAGE, "?colour=red", JPEG, 422, ["colour is not a valid input"]),
    "unknown format": (IMAGE, "?output_format=obj", JPEG, 422, ["output_format", "sog"]),
    "not a number": (IMAGE, "?max_gaussians=many", JPEG, 422, ["max_gaussians"]),
    "negative focal length": (IMAGE, "?focal_length_px=-3", JPEG, 422, ["focal_length_px"]),
    "option twice": (IMAGE, "?output_format=sog&output_format=spz", JPEG, 422, ["more than once"]),
    "body and image_url": (IMAGE, "?image_url=https://example.com/a.jpg", JPEG, 422, ["body"]),
    "JSON not JSON": (b"{nope", "", JSON, 422, ["not valid JSON"]),
    "JSON not an object": (b"[1, 2]", "", JSON, 422, ["must be a JSON object"]),
    "JSON and query options": (job(image=IMAGE_B64), "?output_format=sog", JSON, 422, ["in the JSON"]),
    "JSON bad base64": (job(image="not base64 at all!"), "", JSON, 422, ["not valid base64"]),
    "JSON wrong type": (job(image=12345), "", JSON, 422, ["image should be", "Expected:"]),
    "JSON image and image_url": (
        job(image=IMAGE_B64, image_url="https://example.com/a.jpg"), "", JSON, 422, ["either"]
    ),
    "private image_url": (
        job(image_url="http://127.0.0.1:9/a.jpg"), "", JSON, 422, ["not a public internet address"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ERRORS)
def test_errors_have_their_status_and_message(server, name):
    body, query, headers, status, fragments = ERRORS[name]
    body = body() if callable(body) else body
    error_of(server.predict(body, query, **headers), status, *fragments)
    assert server.alive()


def test_a_body_without_content_length_is_cut_off_at_the_limit(server):
    """Chunked: only counting the bytes as they come can stop it."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    chunks = (bytes(1 << 20) for _ in range(4))
    connection.request("POST", "/predict", body=chunks, headers=JPEG, encode_chunked=True)
    response = connection.getresponse()
    answer = Answer(
        response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    )
    connection.close()
    error_of(answer, 413, "larger than 2,000,000")


def test_unknown_paths_and_methods(server):
    assert request(f"{server.url}/nothing").status == 404
    assert request(f"{server.url}/predict").status == 405


# --- 6. the page: a photo in, its splat on the canvas ---------------------------------------------


def photo_gray(size: tuple[int, int]) -> np.ndarray:
    upright = ImageOps.exif_transpose(Image.open(SAMPLE)).convert("L")
    return np.asarray(upright.resize(size, Image.Resampling.BOX), np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def drive_page(url: str, out: Path, photo: Path | None = None) -> dict[str, Any]:
    """tests/js/page.mjs: the page in headless Chromium; returns what the page reported."""
    node, chromium = viewers.require_spark()
    spec = {
        "url": url,
        "photo": str(photo) if photo else None,
        "out": str(out),
        "width": PAGE_SIZE[0],
        "height": PAGE_SIZE[1],
        "chromium": str(chromium),
        "timeoutMs": 600_000,
    }
    done = subprocess.run(
        [node, str(viewers.JS_DIR / "page.mjs"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=720,
        cwd=viewers.JS_DIR,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_shows_the_photo(frame_png: Path) -> None:
    """The tiny untrained model's Gaussians carry the photo's colours on its pixels' rays: from
    the capture camera, upright, the splat is the photo."""
    frame = np.asarray(Image.open(frame_png).convert("RGB"), np.float64)
    assert frame.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3)
    gray = frame @ np.array([0.299, 0.587, 0.114])
    photo = photo_gray(PAGE_SIZE)
    upright = correlation(gray, photo)
    flipped = correlation(gray, photo[::-1])
    assert upright > 0.8 and upright > flipped + 0.3, (upright, flipped)


def test_page_shows_the_splat_of_a_photo(server, tmp_path):
    page = request(f"{server.url}/")
    assert page.status == 200 and b"/modules/@sparkjsdev/spark/" in page.body
    report = drive_page(f"{server.url}/", tmp_path / "page.png", photo=SAMPLE)
    assert report["viewer"]["format"] == "sog"
    assert report["viewer"]["numSplats"] == UNPRUNED_COUNT
    assert_shows_the_photo(tmp_path / "page.png")


def test_page_loads_the_pinned_packages_from_the_cdn_by_default():
    pins = json.loads((viewers.JS_DIR / "package.json").read_text())["dependencies"]
    assert {name: pins[name] for name in PINNED} == PINNED
    imports = import_map(None)["imports"]
    assert imports["three"].endswith(f"/three@{PINNED['three']}/build/three.module.js")
    spark = PINNED["@sparkjsdev/spark"]
    assert imports["@sparkjsdev/spark"].endswith(f"/@sparkjsdev/spark@{spark}/dist/spark.module.js")


def test_view_command_shows_a_file_the_same_way(results, tmp_path):
    path = tmp_path / "coffee.sog"
    path.write_bytes(results.get("sog-unpruned").body)
    env = {**os.environ, "SHARP_VIEWER_MODULES": str(viewers.NODE_MODULES)}
    command = [sys.executable, "-m", "engine.cli", "view", str(path), "--no-browser"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # "Showing FILE at http://127.0.0.1:PORT/ ..."
        url = next(word for word in line.split() if word.startswith("http://"))
        report = drive_page(url, tmp_path / "view.png")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert report["viewer"]["numSplats"] == UNPRUNED_COUNT
    assert_shows_the_photo(tmp_path / "view.png")


def test_the_worker_still_serves(server):
    assert server.alive()
    assert request(f"{server.url}/ping").status == 200
    assert "Traceback" not in server.log_text()


# --- 7. the worker's own failures: 500 without a trace, and a failed GPU takes it out of service ---


def app_with(error: Exception, device: str) -> TestClient:
    settings = Settings.from_env({})
    state = ServerState(SharpWorker(settings, FailingPredictor(error, device), None))
    return TestClient(create_app(settings, state), raise_server_exceptions=False)


def test_an_internal_error_is_500_without_a_trace():
    client = app_with(ValueError("unexpected"), "cpu")
    answer = client.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (ValueError): unexpected"}
    assert client.get("/ping").status_code == 200  # a bug in one job is not a broken worker


def test_a_gpu_fault_answers_503_and_takes_the_worker_out_of_service():
    client = app_with(RuntimeError("CUDA error: an illegal memory access was encountered"), "cuda")
    answer = client.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 503 and "the GPU failed" in answer.json()["error"]
    assert client.get("/ping").status_code == 503  # RunPod replaces an unhealthy worker
    again = client.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert again.status_code == 503 and "no longer serves" in again.json()["error"]


def test_view_command_refuses_what_it_cannot_show(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in (
        (tmp_path / "missing.sog", "is not a file"),
        (tmp_path / "notes.txt", "shows .ply"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "view", str(path), "--no-browser"],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
