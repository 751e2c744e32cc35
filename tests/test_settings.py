"""Settings: every environment variable parsed in engine.settings, bad values tried as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.settings import (
    DEFAULT_MAX_INLINE_BYTES,
    EngineSettings,
    Settings,
    SettingsError,
    WorkerSettings,
    default_cache_dir,
)
from engine.settings.variables import VARIABLES, markdown_table

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "handler", "export", "benchmarks")


def test_defaults():
    settings = Settings.from_env({})
    engine, worker = settings.engine, settings.worker
    assert engine.checkpoint is None and engine.device == "auto" and engine.backend == "auto"
    assert engine.precision is None and engine.fp32_blocks is None and engine.engine_build
    assert (
        engine.resolved_precision("cuda") == "fp16" and engine.resolved_precision("cpu") == "fp32"
    )
    assert engine.engine_directory == engine.cache_dir / "engines"
    assert worker.max_inline_bytes == DEFAULT_MAX_INLINE_BYTES == 19_000_000
    assert worker.max_image_bytes == 25_000_000 and worker.url_timeout_s == 30
    assert not worker.allow_private_urls and worker.bucket is None and not worker.local_api
    assert str(worker.hf_cache_dir) == "/runpod-volume/huggingface-cache/hub"


def test_values_are_parsed_and_empty_counts_as_unset(tmp_path):
    env = {
        "SHARP_DEVICE": "",
        "BUCKET_ENDPOINT_URL": " ",
        "SHARP_BACKEND": "TensorRT",
        "SHARP_PRECISION": "bf16",
        "SHARP_FP32_BLOCKS": "head, prediction_head",
        "SHARP_ENGINE_DIR": str(tmp_path / "engines"),
        "SHARP_PREBUILT_ENGINE_DIR": str(tmp_path / "baked"),
        "SHARP_ENGINE_BUILD": "off",
        "SHARP_TRT_WORKSPACE_GB": "2.5",
    }
    engine = EngineSettings.from_env(env)
    assert engine.device == "auto" and engine.backend == "tensorrt" and engine.precision == "bf16"
    assert engine.fp32_blocks == ("monodepth_model.monodepth_predictor.head", "prediction_head")
    assert engine.artifact_dirs() == (tmp_path / "engines", tmp_path / "baked")
    assert not engine.engine_build and engine.trt_workspace_gb == 2.5
    assert WorkerSettings.from_env(env).bucket is None


def test_bucket_settings_hide_the_secret():
    env = {
        "BUCKET_ENDPOINT_URL": "https://s3.example.com",
        "BUCKET_ACCESS_KEY_ID": "id",
        "BUCKET_SECRET_ACCESS_KEY": "very-secret",
        "SHARP_URL_EXPIRY_S": "600",
    }
    settings = Settings.from_env(env)
    assert settings.worker.bucket.url_expiry_s == 600 and settings.worker.bucket.name is None
    assert "very-secret" not in repr(settings)


def test_cache_dir_follows_environment(tmp_path):
    assert default_cache_dir({"SHARP_CACHE_DIR": str(tmp_path / "cache")}) == tmp_path / "cache"
    xdg = default_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert xdg in (tmp_path / "xdg" / "sharp-runpod", Path("/runpod-volume/sharp-cache"))


BAD = [
    ({"SHARP_DEVICE": "gpu"}, "SHARP_DEVICE must be one of auto, cpu, cuda; got 'gpu'"),
    (
        {"SHARP_BACKEND": "warp"},
        "SHARP_BACKEND must be one of auto, tensorrt, compiled, exported, eager",
    ),
    ({"SHARP_PRECISION": "fp8"}, "SHARP_PRECISION must be one of fp32, fp16, bf16; got 'fp8'"),
    ({"SHARP_FP32_BLOCKS": "decoder"}, "SHARP_FP32_BLOCKS: 'decoder' names 2 blocks"),
    ({"SHARP_ENGINE_BUILD": "maybe"}, "SHARP_ENGINE_BUILD must be one of auto, off"),
    ({"SHARP_TRT_WORKSPACE_GB": "0"}, "SHARP_TRT_WORKSPACE_GB must be a positive number of GiB"),
    ({"SHARP_MAX_INLINE_BYTES": "lots"}, "SHARP_MAX_INLINE_BYTES must be a whole number"),
    ({"SHARP_MAX_PIXELS": "0"}, "SHARP_MAX_PIXELS must be a whole number at least 1"),
    ({"SHARP_URL_TIMEOUT_S": "-1"}, "SHARP_URL_TIMEOUT_S must be a positive number of seconds"),
    ({"SHARP_URL_EXPIRY_S": "9999999"}, "at most 604,800"),
    ({"RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "on"}, "must be one of 1, true, yes"),
    ({"BUCKET_ENDPOINT_URL": "https://s3.example.com"}, "BUCKET_ACCESS_KEY_ID is not set"),
    (
        {
            "BUCKET_ENDPOINT_URL": "s3.example.com",
            "BUCKET_ACCESS_KEY_ID": "a",
            "BUCKET_SECRET_ACCESS_KEY": "b",
        },
        "BUCKET_ENDPOINT_URL must be an http(s) URL",
    ),
    ({"SHARP_SERVE": "grpc"}, "SHARP_SERVE must be one of queue, http; got 'grpc'"),
    ({"PORT": "70000"}, "PORT must be a whole number at least 1 and at most 65,535"),
    ({"PORT_HEALTH": "health"}, "PORT_HEALTH must be a whole number"),
    ({"SHARP_MAX_QUEUED": "0.5"}, "SHARP_MAX_QUEUED must be a whole number"),
    ({"SHARP_MAX_BODY_BYTES": "-1"}, "SHARP_MAX_BODY_BYTES must be a whole number"),
]


@pytest.mark.parametrize(("env", "message"), BAD)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


def test_private_url_switch_uses_the_sdk_values():
    for value, expected in [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("0", False),
        ("no", False),
    ]:
        settings = WorkerSettings.from_env({"RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": value})
        assert settings.allow_private_urls is expected


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "BUCKET_", "RUNPOD_"))
    }
    return subprocess.run(
        command, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


CLI = [str(Path(sys.executable).with_name("sharp-runpod")), "predict", "samples/coffee.jpg", "-o"]


@pytest.mark.parametrize(("env", "message"), [BAD[1], BAD[2], BAD[3], BAD[11], BAD[-5]])
def test_worker_and_cli_stop_with_one_line(env, message, tmp_path):
    """As a user meets it: the worker exits 1 and the CLI 2, each with one line, no traceback."""
    for command, code in (([sys.executable, "-m", "handler"], 1), (CLI + [str(tmp_path)], 2)):
        result = _run(command, {"SHARP_CHECKPOINT": "tiny-untrained", **env})
        assert result.returncode == code, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_no_module_but_settings_reads_the_environment():
    readers = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "engine/settings/" not in path.as_posix() and readers.search(path.read_text())
    ]
    # The CLI and worker pass settings down; benchmarks may read their own options.
    assert [o for o in offenders if not o.startswith("benchmarks/")] == [], offenders


def test_readme_configuration_table_is_the_settings_modules():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README is stale: paste `python -m engine.settings`"
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.MULTILINE))
    assert rows == {variable.name for variable in VARIABLES}  # no other variable table
