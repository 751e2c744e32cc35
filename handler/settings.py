"""Worker configuration: every environment variable the worker reads, parsed in one place.

An empty value counts as unset, because RunPod templates and Hub forms pass "" for fields
left blank. A value that is set but malformed stops the worker at start with a message that
names the variable, instead of surfacing later as a failed job.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.io.checkpoint import cache_dir
from engine.io.images import DEFAULT_MAX_PIXELS

# RunPod's job-done call, and with it a /runsync response, carries at most 20 MB
# (docs.runpod.io/serverless/endpoints/operations). A larger result is dropped by the
# platform while the job still reads COMPLETED (runpod-python issue #309), so the worker
# keeps the base64 payload under this limit less room for the JSON around it.
PLATFORM_RESULT_LIMIT_BYTES = 20_000_000
ENVELOPE_HEADROOM_BYTES = 1_000_000
DEFAULT_MAX_INLINE_BYTES = PLATFORM_RESULT_LIMIT_BYTES - ENVELOPE_HEADROOM_BYTES

DEFAULT_MAX_IMAGE_BYTES = 25_000_000
DEFAULT_URL_CONNECT_TIMEOUT_S = 5.0
DEFAULT_URL_TIMEOUT_S = 30.0
DEFAULT_URL_EXPIRY_S = 3600
MAX_URL_EXPIRY_S = 604_800  # the longest an S3 SigV4 presigned URL may live
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")
DEVICES = ("auto", "cpu", "cuda")

# The RunPod SDK's switch for fetching job-supplied URLs on private networks; the SDK
# treats exactly these values as "on" (runpod/serverless/utils/rp_ssrf.py).
ALLOW_PRIVATE_ENV = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
_SDK_TRUE = ("1", "true", "yes")
_SDK_FALSE = ("0", "false", "no")
BUCKET_ENV = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")


class SettingsError(ValueError):
    """An environment variable has a value the worker cannot use."""


@dataclass(frozen=True)
class BucketSettings:
    """An S3-compatible bucket for results too large to return inline."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    name: str | None  # None: the RunPod SDK's convention, a bucket named after the month
    url_expiry_s: int


@dataclass(frozen=True)
class WorkerSettings:
    checkpoint: str | None  # None: Apple's published checkpoint
    device: str
    cache_dir: Path
    hf_cache_dir: Path
    max_inline_bytes: int  # on the base64 text of an inline result
    max_image_bytes: int
    max_pixels: int
    url_connect_timeout_s: float
    url_timeout_s: float  # whole download, DNS to last byte, redirects included
    allow_private_urls: bool
    bucket: BucketSettings | None
    local_api: bool
    sdk_log_level: str  # the RunPod SDK's own variables; INFO where it would default to DEBUG

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        device = _get(env, "SHARP_DEVICE") or "auto"
        if device not in DEVICES:
            raise SettingsError(f"SHARP_DEVICE must be one of {', '.join(DEVICES)}, got {device!r}")
        cache = _get(env, "SHARP_CACHE_DIR")
        return cls(
            checkpoint=_get(env, "SHARP_CHECKPOINT"),
            device=device,
            cache_dir=Path(cache).expanduser() if cache else cache_dir(),
            hf_cache_dir=Path(_get(env, "HF_HUB_CACHE") or RUNPOD_HF_CACHE),
            max_inline_bytes=_int(env, "SHARP_MAX_INLINE_BYTES", DEFAULT_MAX_INLINE_BYTES),
            max_image_bytes=_int(env, "SHARP_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES),
            max_pixels=_int(env, "SHARP_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            url_connect_timeout_s=_seconds(
                env, "SHARP_URL_CONNECT_TIMEOUT_S", DEFAULT_URL_CONNECT_TIMEOUT_S
            ),
            url_timeout_s=_seconds(env, "SHARP_URL_TIMEOUT_S", DEFAULT_URL_TIMEOUT_S),
            allow_private_urls=_sdk_flag(env, ALLOW_PRIVATE_ENV),
            bucket=_bucket(
                env, _int(env, "SHARP_URL_EXPIRY_S", DEFAULT_URL_EXPIRY_S, MAX_URL_EXPIRY_S)
            ),
            local_api=_sdk_flag(env, "SHARP_LOCAL_API"),
            sdk_log_level=(
                _get(env, "RUNPOD_LOG_LEVEL") or _get(env, "RUNPOD_DEBUG_LEVEL") or "INFO"
            ),
        )


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        number = float(raw.replace("_", ""))  # forms send numbers as "3600" or "3600.0"
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if not number.is_integer():
        raise SettingsError(f"{name} must be a whole number, got {raw!r}")
    value = int(number)
    if value < 1 or (maximum is not None and value > maximum):
        limit = f" and at most {maximum:,}" if maximum is not None else ""
        raise SettingsError(f"{name} must be at least 1{limit}, got {value:,}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _sdk_flag(env: Mapping[str, str], name: str) -> bool:
    """The SDK's true values; its false values and unset are false; anything else is an error.

    The SDK silently reads any other value (such as "on") as false; refusing it here keeps
    a typo from quietly changing what the worker does.
    """
    raw = _get(env, name)
    if raw is None or raw.lower() in _SDK_FALSE:
        return False
    if raw.lower() in _SDK_TRUE:
        return True
    raise SettingsError(f"{name} must be one of {', '.join(_SDK_TRUE + _SDK_FALSE)}, got {raw!r}")


def _bucket(env: Mapping[str, str], url_expiry_s: int) -> BucketSettings | None:
    values = {name: _get(env, name) for name in BUCKET_ENV}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise SettingsError(
            f"bucket upload needs all of {', '.join(BUCKET_ENV)}; {', '.join(missing)} "
            "is not set. Set it, or unset the others to return results inline only."
        )
    if not values["BUCKET_ENDPOINT_URL"].startswith(("https://", "http://")):
        raise SettingsError(
            "BUCKET_ENDPOINT_URL must be an http(s) URL such as "
            f"https://s3.us-east-1.amazonaws.com, got {values['BUCKET_ENDPOINT_URL']!r}"
        )
    return BucketSettings(
        endpoint_url=values["BUCKET_ENDPOINT_URL"],
        access_key_id=values["BUCKET_ACCESS_KEY_ID"],
        secret_access_key=values["BUCKET_SECRET_ACCESS_KEY"],
        name=_get(env, "BUCKET_NAME"),
        url_expiry_s=url_expiry_s,
    )
