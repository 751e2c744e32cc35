"""A job's `input` object: validated with the RunPod SDK's validator, then the image bytes."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from engine.results import PLY_LAYOUTS, OutputOptions
from engine.splats.formats import FORMATS
from engine.splats.formats.spz import DEFAULT_VERSION as SPZ_DEFAULT_VERSION
from engine.splats.formats.spz import VERSIONS as SPZ_VERSIONS

from .fetch import FetchPolicy, fetch

DELIVERIES = ("inline", "url")

# What the client may send; listed after every validation error so the fix is at hand.
FIELD_GUIDE = (
    "image (base64 string or data: URL) or image_url (http(s) URL), and optionally "
    "focal_length_px (number > 0), "
    f"output_format ({' | '.join(FORMATS)}), "
    f"ply_layout ({' | '.join(PLY_LAYOUTS)}), "
    f"spz_version ({' | '.join(map(str, SPZ_VERSIONS))}), "
    "max_gaussians (integer >= 1), min_opacity (number 0..1), prune_to_fit (boolean), "
    f"return ({' | '.join(DELIVERIES)})"
)


def _positive_finite(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and value > 0)


def _positive_int(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _fraction(value: Any) -> bool:
    return value is None or (isinstance(value, float) and 0 <= value <= 1)


# Defaults are applied after validation, not by rp_validator: it skips a field's constraints
# whenever the value has the type of the default (runpod 1.12, rp_validator.py), so a
# default of "ply" would let any string through. Every default here is None instead.
# It also calls constraints after a type error, so each constraint checks the type itself.
SCHEMA: dict[str, dict[str, Any]] = {
    "image": {"type": str, "required": False, "default": None},
    "image_url": {"type": str, "required": False, "default": None},
    "focal_length_px": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": _positive_finite,
    },
    "output_format": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or value in FORMATS,
    },
    "ply_layout": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or value in PLY_LAYOUTS,
    },
    "spz_version": {
        "type": int,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or value in SPZ_VERSIONS,
    },
    "max_gaussians": {
        "type": int,
        "required": False,
        "default": None,
        "constraints": _positive_int,
    },
    "min_opacity": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": _fraction,
    },
    "prune_to_fit": {"type": bool, "required": False, "default": None},
    "return": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or value in DELIVERIES,
    },
}
DEFAULTS = {
    "output_format": "ply",
    "ply_layout": "standard",
    "spz_version": SPZ_DEFAULT_VERSION,
    "prune_to_fit": True,
}


class InputError(ValueError):
    """The job input cannot be used; the message is meant for the client."""


@dataclass(frozen=True)
class JobRequest:
    image: str | None
    image_url: str | None
    focal_length_px: float | None
    output: OutputOptions
    delivery: str | None  # None: inline when it fits, else a URL when a bucket is configured


def parse_request(job_input: Any) -> JobRequest:
    if not isinstance(job_input, dict):
        raise InputError(f"input must be a JSON object with {FIELD_GUIDE}")
    result = validate(job_input, SCHEMA)
    if "errors" in result:
        raise InputError(f"invalid input: {' '.join(result['errors'])} Expected: {FIELD_GUIDE}.")
    fields = {**result["validated_input"]}
    for name, default in DEFAULTS.items():
        if fields[name] is None:
            fields[name] = default
    if fields["image"] is None and fields["image_url"] is None:
        raise InputError(f"no image given: send {FIELD_GUIDE}")
    if fields["image"] is not None and fields["image_url"] is not None:
        raise InputError("send either image or image_url, not both")
    return JobRequest(
        image=fields["image"],
        image_url=fields["image_url"],
        focal_length_px=fields["focal_length_px"],
        output=OutputOptions(
            format=fields["output_format"],
            ply_layout=fields["ply_layout"],
            spz_version=fields["spz_version"],
            max_gaussians=fields["max_gaussians"],
            min_opacity=fields["min_opacity"],
            prune_to_fit=fields["prune_to_fit"],
        ),
        delivery=fields["return"],
    )


def image_bytes(request: JobRequest, policy: FetchPolicy) -> bytes:
    """The encoded image the client sent, inline or behind `image_url`."""
    if request.image_url is not None:
        return fetch(request.image_url, policy)
    return decode_base64_image(request.image or "", policy.max_bytes)


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, line breaks allowed) or a base64 data: URL."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InputError(
                "a data: URL in image must be base64-encoded, like data:image/jpeg;base64,/9j/..."
            )
    text = "".join(text.split())
    if not text:
        raise InputError("image is empty: send the image file's bytes as base64")
    if len(text) // 4 * 3 > max_bytes:
        raise InputError(
            f"the image is larger than {max_bytes:,} bytes; send a smaller image "
            "(SHARP_MAX_IMAGE_BYTES sets this limit)"
        )
    alphabet = b"-_" if "-" in text or "_" in text else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=alphabet, validate=True)
    except binascii.Error as error:
        raise InputError(
            f"image is not valid base64 ({error}); send the file's bytes base64-encoded, "
            "e.g. base64.b64encode(open(path, 'rb').read()).decode()"
        ) from None
