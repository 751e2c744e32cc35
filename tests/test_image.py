"""The image users deploy, built from the Dockerfile and run: `make image-check`.

The Dockerfile is built unchanged, with only its build arguments set, on a stand-in of the
real base (tests/image/buildah.py says how and why), then started with its own command the
way `docker run -p 8000:8000 sharp-runpod` starts it, outside RunPod. Jobs go to its local
API as to a deployed worker's: a base64 image and an image_url on a local HTTP server, each
answered with the whole splat as .sog, which splat-transform must read. Tiny model, CPU.
Needs root, buildah and mmdebstrap; skips saying which is missing.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from handler_support import REPO, SAMPLE, ImageHost, free_port, http_get, post_json
from image import buildah
from viewers import require_splat_transform, splat_transform_read

MISSING = buildah.missing_requirement()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"image check skipped: {MISSING}")
FULL_SPLAT = 1_179_648  # every Gaussian the model predicts, whatever the image's size


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="module")
def image(logs) -> Iterator[str]:
    require_splat_transform()  # before minutes of building, not after
    base = buildah.build_standin_base(logs / "base.log")
    built = buildah.build_project_image(base, logs / "build.log")
    yield built
    buildah.remove_image(built)  # vfs keeps a whole copy of every image: 2 GB each


@pytest.fixture(scope="module")
def served(image, logs) -> Iterator[str]:
    """The image started outside RunPod: its local API, on a free port of the host's network."""
    port = free_port()  # a container's 8000 would be published; here it shares the host's
    env = {
        "SHARP_CHECKPOINT": "tiny-untrained",
        "SHARP_DEVICE": "cpu",
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",  # the image host is on 127.0.0.1
    }
    log = logs / "container.log"
    with buildah.running_container(image, env, ["--rp_api_port", str(port)], log) as process:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, f"the container exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving:\n{log.read_text()[-4000:]}"
            try:
                http_get(f"{url}/openapi.json", timeout=5)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        yield url


def full_sog(url: str, job_input: dict, tmp_path: Path) -> dict:
    answer = post_json(f"{url}/runsync", {"input": {**job_input, "output_format": "sog"}})
    assert answer["status"] == "COMPLETED", str(answer)[:3000]
    output = answer["output"]
    assert output["delivery"] == "inline" and output["num_gaussians"] == FULL_SPLAT
    path = tmp_path / "result.sog"
    path.write_bytes(base64.b64decode(output["sog"]))
    assert splat_transform_read(path)["count"] == FULL_SPLAT
    return output


def test_image_keeps_the_base_torch(image):
    """torch in the image is the base's, imported from outside the image's environment, and
    the image starts with `python3`, which every base has (the stand-in has no `python`)."""
    probe = "import torch; print(torch.__version__, torch.__file__)"
    version, location = buildah.run_once(image, ["python3", "-c", probe]).split()
    assert version == buildah.TORCH_VERSION + "+cpu" and not location.startswith("/opt/venv/")
    assert buildah.image_cmd(image)[0] == "python3"
    alias = buildah.run_once(buildah.BASE_TAG, ["sh", "-c", "command -v python || echo none"])
    assert alias.strip() == "none"


def test_image_answers_a_base64_image(served, tmp_path):
    image = base64.b64encode(SAMPLE.read_bytes()).decode()
    output = full_sog(served, {"image": image}, tmp_path)
    assert output["device"] == "cpu" and output["model"]["untrained"]


def test_image_answers_an_image_url(served, tmp_path):
    with ImageHost(SAMPLE.read_bytes()) as host:
        output = full_sog(served, {"image_url": host.url("/coffee.jpg")}, tmp_path)
    assert output["image_size"]["width"] > 0


def test_image_one_job_mode_runs_test_input(image, logs):
    """SHARP_LOCAL_API=0: the SDK's local test of the image's test_input.json, exit 0."""
    env = {"SHARP_CHECKPOINT": "tiny-untrained", "SHARP_DEVICE": "cpu", "SHARP_LOCAL_API": "0"}
    log = logs / "one-job.log"
    with buildah.running_container(image, env, [], log) as process:
        try:
            code = process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the one-job run did not end:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()[-4000:]
    assert "Local testing complete" in log.read_text()
    job = json.loads((REPO / "test_input.json").read_text())["input"]
    assert job["output_format"] == "sog"
