"""The worker as deployed: `python -m handler --rp_serve_api`, called over HTTP.

Two real servers with the tiny untrained model on the CPU, each started once for this module:
`open_worker` may fetch loopback URLs (RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS) and has a bucket
(moto's S3 server) and an inline limit above the tiny model's 88 MB result; `strict_worker`
has the defaults a deployment has: no private URLs, no bucket, and a small inline limit.
Requests that run the model are few, because each costs seconds of CPU.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from handler_support import (
    REPO,
    SAMPLE,
    ImageHost,
    WorkerServer,
    http_get,
    moto_s3,
    png_bytes,
    worker_server,
)
from PIL import Image

from engine.io.images import decode_image
from engine.runtime.predictor import SharpPredictor
from engine.settings import DEFAULT_MAX_INLINE_BYTES
from engine.splats.formats.ply import read_ply, vertex_rows
from engine.splats.formats.sog_reader import read_sog

IMAGE = SAMPLE.read_bytes()
IMAGE_B64 = base64.b64encode(IMAGE).decode()


@pytest.fixture(scope="module")
def image_host():
    with ImageHost(IMAGE) as host:
        yield host


@pytest.fixture(scope="module")
def bucket_env():
    with moto_s3("sharp-results") as env:
        yield env


@pytest.fixture(scope="module")
def open_worker(tmp_path_factory, bucket_env):
    env = {
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
        "SHARP_MAX_INLINE_BYTES": "200000000",
        "SHARP_URL_TIMEOUT_S": "3",
        **bucket_env,
    }
    with worker_server(env, tmp_path_factory.mktemp("logs") / "open.log") as server:
        yield server


@pytest.fixture(scope="module")
def strict_worker(tmp_path_factory):
    env = {"SHARP_MAX_INLINE_BYTES": "1000"}
    with worker_server(env, tmp_path_factory.mktemp("logs") / "strict.log") as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    """The engine's own output for the sample, in this process (the model is deterministic)."""
    predictor = SharpPredictor.from_checkpoint("tiny-untrained", device="cpu")
    prediction = predictor.predict(decode_image(IMAGE))
    return prediction, vertex_rows(prediction.gaussians).numpy()


@pytest.fixture(scope="module")
def inline_result(open_worker):
    answer = open_worker.runsync({"image": IMAGE_B64})
    assert answer["status"] == "COMPLETED", answer
    return answer["output"]


def expect_failure(server: WorkerServer, job_input: object, *fragments: str) -> str:
    answer = server.runsync(job_input)
    assert answer["status"] == "FAILED", answer
    error = answer["error"]
    for fragment in fragments:
        assert fragment in error, error
    assert server.alive(), server.log_tail()
    return error


def test_base64_request_matches_the_engine(open_worker, inline_result, reference):
    prediction, rows = reference
    out = inline_result
    assert out["status"] == "success" and out["format"] == "ply" and out["delivery"] == "inline"
    assert out["ply_layout"] == "standard"
    assert out["num_gaussians"] == out["num_gaussians_predicted"] == 1_179_648
    assert out["num_gaussians"] == len(prediction.gaussians)
    assert out["image_size"] == {"width": 400, "height": 600}
    assert out["focal_length_px"] == pytest.approx(prediction.focal_length_px)
    assert out["model"] == {"checkpoint": "tiny-untrained", "untrained": True}
    assert (out["backend"], out["precision"], out["device"]) == ("eager", "fp32", "cpu")
    assert set(out["timings_ms"]) == {
        "input", "decode", "inference", "postprocess", "encode", "deliver"
    }  # fmt: skip
    assert open_worker.log.stat().st_size < 1_000_000, "the SDK logged the result"
    ply = base64.b64decode(out["ply"])
    assert len(ply) == out["size_bytes"]
    vertices = read_ply(ply).vertices
    stored = np.stack([vertices[name] for name in vertices.dtype.names], axis=1)
    np.testing.assert_allclose(stored, rows, rtol=1e-5, atol=1e-5)


# name -> (job input, or a path on the image host, or a marker for a generated image;
#          fragments the error must contain)
BAD_INPUTS = {
    "missing image": ({}, ["no image given", "image_url"]),
    "image and image_url": (
        {"image": IMAGE_B64, "image_url": "https://example.com/a.jpg"},
        ["either image or image_url"],
    ),
    "bad base64": ({"image": "not base64 at all!"}, ["not valid base64"]),
    "data URL not base64": ({"image": "data:image/png,abc"}, ["must be base64-encoded"]),
    "not an image": (
        {"image": base64.b64encode(b"just some text").decode()},
        ["not an image in a supported format"],
    ),
    "unsupported format": ("ICO", ["unsupported image format 'ICO'"]),
    "too many pixels": ("HUGE", ["above the limit of 40,000,000"]),
    "unknown field": ({"image": IMAGE_B64, "colour": "red"}, ["colour is not a valid input"]),
    "wrong type": ({"image": 12345}, ["image should be", "Expected:"]),
    "negative focal": ({"image": IMAGE_B64, "focal_length_px": -3}, ["focal_length_px does not"]),
    "unknown layout": ({"image": IMAGE_B64, "ply_layout": "fancy"}, ["ply_layout", "standard"]),
    "unknown format": ({"image": IMAGE_B64, "output_format": "obj"}, ["output_format"]),
    "unknown return": ({"image": IMAGE_B64, "return": "email"}, ["return", "inline | url"]),
    "ftp scheme": ({"image_url": "ftp://example.com/a.jpg"}, ["http:// or https://"]),
    "file scheme": ({"image_url": "file:///etc/passwd"}, ["http:// or https://"]),
    "unresolvable host": (
        {"image_url": "http://no-such-host.invalid/a.jpg"},
        ["no-such-host.invalid"],
    ),
    "404": ("/missing.jpg", ["HTTP 404"]),
    "500": ("/broken.jpg", ["HTTP 500"]),
    "text at the URL": ("/text", ["not an image in a supported format"]),
    "too large, no Content-Length": ("/huge-undeclared", ["larger than 25,000,000 bytes"]),
    "too slow": ("/slow", ["longer than 3 s"]),
}


def _materialise(case: object, image_host: ImageHost) -> object:
    if case == "ICO":
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="ICO")
        return {"image": base64.b64encode(buffer.getvalue()).decode()}
    if case == "HUGE":  # 42 megapixels that compress to a few kilobytes
        return {"image": base64.b64encode(png_bytes(7000, 6000, mode="1")).decode()}
    if isinstance(case, str):
        return {"image_url": image_host.url(case)}
    return case


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_the_job_clearly(open_worker, image_host, name):
    case, fragments = BAD_INPUTS[name]
    expect_failure(open_worker, _materialise(case, image_host), *fragments)


def test_url_input_after_bad_inputs_returns_a_presigned_url(
    open_worker, image_host, inline_result, bucket_env
):
    """Runs after the bad inputs above: the same worker still serves, through a redirect."""
    answer = open_worker.runsync({"image_url": image_host.url("/redirect"), "return": "url"})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["delivery"] == "url" and "ply" not in out
    assert out["ply_url"].startswith(bucket_env["BUCKET_ENDPOINT_URL"] + "/sharp-results/sharp/")
    assert out["url_expires_in_s"] == 3600
    downloaded = http_get(out["ply_url"])
    assert downloaded == base64.b64decode(inline_result["ply"])
    assert out["size_bytes"] == len(downloaded)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/a.jpg",
        "http://localhost:9/a.jpg",
        "http://[::1]:9/a.jpg",
        "http://10.1.2.3/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
    ],
)
def test_private_urls_are_refused_by_default(strict_worker, url):
    expect_failure(strict_worker, {"image_url": url}, "not a public internet address")


def test_return_url_without_a_bucket_fails_before_any_work(strict_worker):
    expect_failure(strict_worker, {"image": IMAGE_B64, "return": "url"}, "needs an S3-compatible")


def test_result_over_the_inline_limit_without_a_bucket_is_an_error(strict_worker):
    """Not COMPLETED without output, which is what RunPod does with an oversized result."""
    error = expect_failure(
        strict_worker,
        {"image": IMAGE_B64},
        "66,060,",
        "over the inline limit of 1,000 base64 bytes",
        "BUCKET_ENDPOINT_URL",
    )
    assert "return='url'" not in error  # no bucket: that remedy would not work
    assert error.index('output_format: "sog"') < error.index("bucket") < error.index("fewer")


@pytest.fixture(scope="module")
def default_worker(tmp_path_factory):
    """A worker as deployed: every limit at its default, no bucket."""
    with worker_server({}, tmp_path_factory.mktemp("logs") / "default.log") as server:
        yield server


def test_full_sog_comes_back_inline_with_the_default_limits(default_worker, reference):
    """test_input.json's job, and the README's first call: the whole splat, no bucket."""
    job_input = json.loads((REPO / "test_input.json").read_text())["input"]
    assert job_input["output_format"] == "sog" and "max_gaussians" not in job_input
    answer = default_worker.runsync({**job_input, "image": IMAGE_B64})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["delivery"] == "inline" and out["num_gaussians"] == 1_179_648
    assert len(out["sog"]) <= DEFAULT_MAX_INLINE_BYTES
    assert len(read_sog(base64.b64decode(out["sog"]))) == len(reference[0].gaussians)


def test_noisy_weights_give_a_full_sog_inline_or_a_pruned_one_by_choice(
    tmp_path_factory, tiny_checkpoint
):
    """Other weights than the built-in model's (the golden ones: noisier fields, 15 MB at the
    containers' finest) still come back whole and inline; under a small limit the client
    chooses between fewer Gaussians and an error."""
    env = {"SHARP_CHECKPOINT": str(tiny_checkpoint)}
    with worker_server(env, tmp_path_factory.mktemp("logs") / "golden.log") as server:
        answer = server.runsync({"image": IMAGE_B64, "output_format": "sog"})
        assert answer["status"] == "COMPLETED", answer
        out = answer["output"]
        assert out["delivery"] == "inline" and out["num_gaussians"] == 1_179_648
        assert out["sog_encoding"]["pruned_to_fit"] is False
        assert len(read_sog(base64.b64decode(out["sog"]))) == 1_179_648
    env["SHARP_MAX_INLINE_BYTES"] = "4000000"
    with worker_server(env, tmp_path_factory.mktemp("logs") / "small.log") as server:
        answer = server.runsync({"image": IMAGE_B64, "output_format": "sog"})
        assert answer["status"] == "COMPLETED", answer
        out = answer["output"]
        assert out["sog_encoding"]["pruned_to_fit"] is True
        assert out["sog_encoding"]["budget_bytes"] == (4_000_000 - 4096) // 4 * 3
        kept = len(read_sog(base64.b64decode(out["sog"])))
        assert kept == out["num_gaussians"] < 1_179_648
        expect_failure(
            server,
            {"image": IMAGE_B64, "output_format": "sog", "prune_to_fit": False},
            "coarsest precision",
            "prune_to_fit",
        )
