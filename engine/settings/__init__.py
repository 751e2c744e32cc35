"""Every environment variable of the engine, the CLI and the worker, parsed once, here.

`Settings.from_env()` reads them into frozen dataclasses that are passed down; no other module
reads the environment. `variables.VARIABLES` lists each with its default and allowed values:
the README's configuration table is tested against it.

An empty value counts as unset, because RunPod templates and Hub forms pass "" for fields left
blank. A value that is set but malformed raises `SettingsError` with one line that names the
variable and what it may be; the worker and the CLI print that line and stop.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.network.blocks import resolve_block

DEFAULT_CHECKPOINT_URL = "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
RUNPOD_VOLUME = Path("/runpod-volume")
RUNPOD_HF_CACHE = RUNPOD_VOLUME / "huggingface-cache" / "hub"

DEVICES = ("auto", "cpu", "cuda")
# tensorrt: a TensorRT engine; compiled: an AOTInductor package; exported: the plain
# torch.export program (no speed-up: it proves the build-and-switch path on any machine).
BACKENDS = ("auto", "tensorrt", "compiled", "exported", "eager")
PRECISIONS = ("fp32", "fp16", "bf16")
ENGINE_BUILDS = ("auto", "off")

# RunPod's job-done call, and with it a /runsync response, carries at most 20 MB
# (docs.runpod.io/serverless/endpoints/operations). A larger result is dropped by the
# platform while the job still reads COMPLETED (runpod-python issue #309), so the worker
# keeps the base64 payload under this limit less room for the JSON around it.
PLATFORM_RESULT_LIMIT_BYTES = 20_000_000
ENVELOPE_HEADROOM_BYTES = 1_000_000
DEFAULT_MAX_INLINE_BYTES = PLATFORM_RESULT_LIMIT_BYTES - ENVELOPE_HEADROOM_BYTES
LOCAL_API_MAX_INLINE_BYTES = 200_000_000  # off RunPod no platform cap applies to a result
DEFAULT_MAX_IMAGE_BYTES = 25_000_000
DEFAULT_MAX_PIXELS = 40_000_000  # checked from the header, before any pixel is decoded
DEFAULT_URL_CONNECT_TIMEOUT_S = 5.0
DEFAULT_URL_TIMEOUT_S = 30.0
DEFAULT_URL_EXPIRY_S = 3600
MAX_URL_EXPIRY_S = 604_800  # the longest an S3 SigV4 presigned URL may live
DEFAULT_TRT_WORKSPACE_GB = 4.0

# How the worker serves: RunPod's job queue (the SDK), or its own HTTP server for RunPod's
# load-balancing endpoints, which take and return at most 30 MB a request
# (docs.runpod.io/serverless/load-balancing).
SERVE_MODES = ("queue", "http")
DEFAULT_PORT = 8000
LOAD_BALANCER_BODY_LIMIT_BYTES = 30_000_000
DEFAULT_MAX_QUEUED = 4

# The RunPod SDK's switch for fetching job-supplied URLs on private networks; the SDK
# treats exactly these values as "on" (runpod/serverless/utils/rp_ssrf.py).
ALLOW_PRIVATE_ENV = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
ON_RUNPOD_ENV = "RUNPOD_WEBHOOK_GET_JOB"  # set on every RunPod worker: the SDK's own test
SDK_TRUE = ("1", "true", "yes")
SDK_FALSE = ("0", "false", "no")
BUCKET_ENV = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class EngineSettings:
    """What the CLI, the build tool and the worker share: model, device, backend, caches."""

    checkpoint: str | None = None  # None: Apple's published checkpoint
    device: str = "auto"
    cache_dir: Path = field(default_factory=lambda: default_cache_dir({}))
    backend: str = "auto"
    precision: str | None = None  # None: fp16 on CUDA, fp32 on the CPU
    fp32_blocks: tuple[str, ...] | None = None  # None: runtime.precision.DEFAULT_FP32_BLOCKS
    engine_dir: Path | None = None  # None: <cache_dir>/engines
    prebuilt_engine_dir: Path | None = None
    engine_build: bool = True  # build a missing engine in a child process
    trt_workspace_gb: float = DEFAULT_TRT_WORKSPACE_GB
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def engine_directory(self) -> Path:
        return self.engine_dir or self.cache_dir / "engines"

    def artifact_dirs(self) -> tuple[Path, ...]:
        """Where artifacts are looked up: the writable engine dir first, then the image's."""
        return (self.engine_directory,) + (
            (self.prebuilt_engine_dir,) if self.prebuilt_engine_dir else ()
        )

    def resolved_precision(self, device_type: str) -> str:
        return self.precision or ("fp16" if device_type == "cuda" else "fp32")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if env is None else env
        blocks = _get(env, "SHARP_FP32_BLOCKS")
        cache_dir = default_cache_dir(env)
        if _get(env, "SHARP_CACHE_DIR"):  # chosen, so it must work; a default may go unused
            _check_writable(cache_dir, "SHARP_CACHE_DIR")
        return cls(
            checkpoint=_get(env, "SHARP_CHECKPOINT"),
            device=_choice(env, "SHARP_DEVICE", DEVICES, "auto"),
            cache_dir=cache_dir,
            backend=_choice(env, "SHARP_BACKEND", BACKENDS, "auto"),
            precision=_choice(env, "SHARP_PRECISION", PRECISIONS, None),
            fp32_blocks=_blocks(blocks) if blocks is not None else None,
            engine_dir=_path(env, "SHARP_ENGINE_DIR"),
            prebuilt_engine_dir=_path(env, "SHARP_PREBUILT_ENGINE_DIR"),
            engine_build=_choice(env, "SHARP_ENGINE_BUILD", ENGINE_BUILDS, "auto") == "auto",
            trt_workspace_gb=_positive(
                env, "SHARP_TRT_WORKSPACE_GB", DEFAULT_TRT_WORKSPACE_GB, "GiB"
            ),
            max_pixels=_int(env, "SHARP_MAX_PIXELS", DEFAULT_MAX_PIXELS),
        )


@dataclass(frozen=True)
class BucketSettings:
    """An S3-compatible bucket for results too large to return inline."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    name: str | None  # None: the RunPod SDK's convention, a bucket named after the month
    url_expiry_s: int


@dataclass(frozen=True)
class HttpSettings:
    """The worker's own HTTP server (`SHARP_SERVE=http`), for RunPod's load-balancing endpoints."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    health_port: int | None = None  # None: /ping on `port` only
    max_body_bytes: int = LOAD_BALANCER_BODY_LIMIT_BYTES
    max_queued: int = DEFAULT_MAX_QUEUED  # waiting behind the request on the GPU
    viewer_modules: Path | None = None  # None: the page loads its modules from the CDN

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        env = os.environ if env is None else env
        port = _int(env, "PORT", DEFAULT_PORT, 65_535)
        health_port = _int(env, "PORT_HEALTH", port, 65_535)
        return cls(
            host=_get(env, "SHARP_HOST") or "0.0.0.0",
            port=port,
            health_port=health_port if health_port != port else None,
            max_body_bytes=_int(env, "SHARP_MAX_BODY_BYTES", LOAD_BALANCER_BODY_LIMIT_BYTES),
            max_queued=_int(env, "SHARP_MAX_QUEUED", DEFAULT_MAX_QUEUED),
            viewer_modules=_path(env, "SHARP_VIEWER_MODULES"),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What only the RunPod worker uses: limits, URL fetching, delivery, the SDK's switches."""

    hf_cache_dir: Path = RUNPOD_HF_CACHE
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES  # on the base64 text of an inline result
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    url_connect_timeout_s: float = DEFAULT_URL_CONNECT_TIMEOUT_S
    url_timeout_s: float = DEFAULT_URL_TIMEOUT_S  # whole download, DNS to last byte
    allow_private_urls: bool = False
    bucket: BucketSettings | None = None
    local_api: bool = False  # SHARP_LOCAL_API, and not on RunPod
    serve: str = "queue"  # one of SERVE_MODES
    http: HttpSettings = field(default_factory=HttpSettings)
    sdk_log_level: str = "INFO"  # the SDK's own variables; INFO where it would default to DEBUG

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        local_api = _sdk_flag(env, "SHARP_LOCAL_API") and _get(env, ON_RUNPOD_ENV) is None
        max_inline = LOCAL_API_MAX_INLINE_BYTES if local_api else DEFAULT_MAX_INLINE_BYTES
        return cls(
            hf_cache_dir=Path(_get(env, "HF_HUB_CACHE") or RUNPOD_HF_CACHE),
            max_inline_bytes=_int(env, "SHARP_MAX_INLINE_BYTES", max_inline),
            max_image_bytes=_int(env, "SHARP_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES),
            url_connect_timeout_s=_positive(
                env, "SHARP_URL_CONNECT_TIMEOUT_S", DEFAULT_URL_CONNECT_TIMEOUT_S, "seconds"
            ),
            url_timeout_s=_positive(env, "SHARP_URL_TIMEOUT_S", DEFAULT_URL_TIMEOUT_S, "seconds"),
            # A local test server fetches from the developer's own machine unless told not to.
            allow_private_urls=(
                _sdk_flag(env, ALLOW_PRIVATE_ENV)
                if _get(env, ALLOW_PRIVATE_ENV) is not None
                else local_api
            ),
            bucket=_bucket(
                env, _int(env, "SHARP_URL_EXPIRY_S", DEFAULT_URL_EXPIRY_S, MAX_URL_EXPIRY_S)
            ),
            local_api=local_api,
            serve=_choice(env, "SHARP_SERVE", SERVE_MODES, "queue"),
            http=HttpSettings.from_env(env),
            sdk_log_level=(
                _get(env, "RUNPOD_LOG_LEVEL") or _get(env, "RUNPOD_DEBUG_LEVEL") or "INFO"
            ),
        )


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings
    worker: WorkerSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(EngineSettings.from_env(env), WorkerSettings.from_env(env))


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """`SHARP_CACHE_DIR`, else a folder on the RunPod network volume, else the user cache."""
    env = os.environ if env is None else env
    if value := _get(env, "SHARP_CACHE_DIR"):
        return Path(value).expanduser()
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "sharp-cache"
    return Path(_get(env, "XDG_CACHE_HOME") or Path.home() / ".cache") / "sharp-runpod"


# --- parsers: each raises SettingsError naming the variable and what it may be ---------------


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str | None):
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}; got {raw!r}")
    return raw.lower()


def _blocks(raw: str) -> tuple[str, ...]:
    try:
        return tuple(resolve_block(b.strip()) for b in raw.split(",") if b.strip())
    except ValueError as error:
        raise SettingsError(f"SHARP_FP32_BLOCKS: {error}") from None


def _check_writable(folder: Path, name: str) -> None:
    """Create `folder` and a file in it, as the cache will: the only test that does not lie
    (permission bits say nothing to root, nor about read-only mounts or /proc)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise SettingsError(
            f"{name}={str(folder)!r} is not a writable folder ({reason}); "
            "set it to one the worker can create and write"
        ) from None


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = _get(env, name)
    return Path(raw).expanduser() if raw else None


def _int(env: Mapping[str, str], name: str, default: int, maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    limit = f" and at most {maximum:,}" if maximum is not None else ""
    try:
        number = float(raw.replace("_", ""))  # forms send numbers as "3600" or "3600.0"
    except ValueError:
        number = math.nan
    if not number.is_integer() or number < 1 or (maximum is not None and number > maximum):
        raise SettingsError(f"{name} must be a whole number at least 1{limit}; got {raw!r}")
    return int(number)


def _positive(env: Mapping[str, str], name: str, default: float, unit: str) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SettingsError(f"{name} must be a positive number of {unit}; got {raw!r}")
    return value


def _sdk_flag(env: Mapping[str, str], name: str) -> bool:
    """The SDK's true values; its false values and unset are false; anything else is an error.

    The SDK silently reads any other value (such as "on") as false; refusing it here keeps
    a typo from quietly changing what the worker does.
    """
    raw = _get(env, name)
    if raw is None or raw.lower() in SDK_FALSE:
        return False
    if raw.lower() in SDK_TRUE:
        return True
    raise SettingsError(f"{name} must be one of {', '.join(SDK_TRUE + SDK_FALSE)}; got {raw!r}")


def _bucket(env: Mapping[str, str], url_expiry_s: int) -> BucketSettings | None:
    values = {name: _get(env, name) for name in BUCKET_ENV}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise SettingsError(
            f"{missing[0]} is not set: bucket upload needs all of {', '.join(BUCKET_ENV)}. "
            "Set it, or unset the others to return results inline only."
        )
    if not values["BUCKET_ENDPOINT_URL"].startswith(("https://", "http://")):
        raise SettingsError(
            "BUCKET_ENDPOINT_URL must be an http(s) URL such as "
            f"https://s3.us-east-1.amazonaws.com; got {values['BUCKET_ENDPOINT_URL']!r}"
        )
    return BucketSettings(
        endpoint_url=values["BUCKET_ENDPOINT_URL"],
        access_key_id=values["BUCKET_ACCESS_KEY_ID"],
        secret_access_key=values["BUCKET_SECRET_ACCESS_KEY"],
        name=_get(env, "BUCKET_NAME"),
        url_expiry_s=url_expiry_s,
    )
