"""A job's `input` object: validated with the RunPod SDK's validator, then the image bytes."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from engine.io.images import MAX_DIAGONAL_FOV_DEG, MIN_DIAGONAL_FOV_DEG
from engine.results import OPTION_RULES, OptionError, OutputOptions

from .fetch import FetchPolicy, fetch

DELIVERIES = ("inline", "url")
# The request's name for each OutputOptions field.
OPTION_FIELDS = {
    "format": "output_format",
    "ply_layout": "ply_layout",
    "spz_version": "spz_version",
    "max_gaussians": "max_gaussians",
    "min_opacity": "min_opacity",
    "prune_to_fit": "prune_to_fit",
}

# What the client may send; listed after every validation error so the fix is at hand.
FIELD_GUIDE = (
    "image (base64 string or data: URL) or image_url (http(s) URL), and optionally "
    "focal_length_px (pixels; a diagonal field of view of "
    f"{MIN_DIAGONAL_FOV_DEG:g} to {MAX_DIAGONAL_FOV_DEG:g} degrees), "
    + "".join(f"{field} ({OPTION_RULES[option]}), " for option, field in OPTION_FIELDS.items())
    + f"return ({' | '.join(DELIVERIES)})"
)
# How many unknown field names a message quotes before it only counts the rest.
_NAMED_UNKNOWN = 5


def _positive_finite(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and value > 0)


# Defaults are applied after validation, not by rp_validator: it skips a field's constraints
# whenever the value has the type of the default (runpod 1.12, rp_validator.py), so a
# default of "ply" would let any string through. Every default here is None instead.
# It also calls constraints after a type error, so each constraint checks the type itself.
# Output options are only typed here; OutputOptions checks their values.
SCHEMA: dict[str, dict[str, Any]] = {
    "image": {"type": str, "required": False, "default": None},
    "image_url": {"type": str, "required": False, "default": None},
    "focal_length_px": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": _positive_finite,
    },
    "output_format": {"type": str, "required": False, "default": None},
    "ply_layout": {"type": str, "required": False, "default": None},
    "spz_version": {"type": int, "required": False, "default": None},
    "max_gaussians": {"type": int, "required": False, "default": None},
    "min_opacity": {"type": float, "required": False, "default": None},
    "prune_to_fit": {"type": bool, "required": False, "default": None},
    "return": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or value in DELIVERIES,
    },
}
_FLOAT_FIELDS = tuple(name for name, rule in SCHEMA.items() if rule["type"] is float)


class InputError(ValueError):
    """The job input cannot be used; the message is meant for the client."""


@dataclass(frozen=True)
class JobRequest:
    image: str | None
    image_url: str | None
    focal_length_px: float | None
    output: OutputOptions
    delivery: str | None  # None: inline when it fits, else a URL when a bucket is configured
    image_data: bytes | None = None  # the image itself, sent as an HTTP request's body


def parse_request(job_input: Any, image_data: bytes | None = None) -> JobRequest:
    """The job input's fields; `image_data`, when given, is the image (an HTTP body)."""
    if not isinstance(job_input, dict):
        raise InputError(f"input must be a JSON object with {FIELD_GUIDE}")
    _check_names(job_input)
    for name in _FLOAT_FIELDS:  # rp_validator's float() raises OverflowError on these
        value = job_input.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and not _fits_float(value):
            raise InputError(f"invalid input: {name} is too large. Expected: {FIELD_GUIDE}.")
    result = validate(job_input, SCHEMA)
    if "errors" in result:
        raise InputError(f"invalid input: {' '.join(result['errors'])} Expected: {FIELD_GUIDE}.")
    fields = result["validated_input"]
    if image_data is not None and (fields["image"] is not None or fields["image_url"] is not None):
        raise InputError("the image is the request body: send no image or image_url with it")
    if image_data is None and fields["image"] is None and fields["image_url"] is None:
        raise InputError(f"no image given: send {FIELD_GUIDE}")
    if fields["image"] is not None and fields["image_url"] is not None:
        raise InputError("send either image or image_url, not both")
    try:
        output = OutputOptions.given(
            **{option: fields[field] for option, field in OPTION_FIELDS.items()}
        )
    except OptionError as error:
        message = error.describe(OPTION_FIELDS[error.option])
        raise InputError(f"invalid input: {message}. Expected: {FIELD_GUIDE}.") from None
    return JobRequest(
        image=fields["image"],
        image_url=fields["image_url"],
        focal_length_px=fields["focal_length_px"],
        output=output,
        delivery=fields["return"],
        image_data=image_data,
    )


def _check_names(job_input: dict[Any, Any]) -> None:
    """Refuse unknown fields in a message of bounded size, however many there are."""
    unknown = [name for name in job_input if name not in SCHEMA]
    if not unknown:
        return
    named = ", ".join(_short(str(name)) for name in unknown[:_NAMED_UNKNOWN])
    if len(unknown) == 1:
        problem = f"{named} is not a valid input"
    else:
        rest = len(unknown) - _NAMED_UNKNOWN
        more = f" and {rest:,} more" if rest > 0 else ""
        problem = f"{len(unknown):,} fields are not valid inputs: {named}{more}"
    raise InputError(f"invalid input: {problem}. Expected: {FIELD_GUIDE}.")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def image_bytes(request: JobRequest, policy: FetchPolicy) -> bytes:
    """The encoded image the client sent, inline or behind `image_url`."""
    if request.image_data is not None:
        return request.image_data  # the HTTP server has held it to the size limit
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
    if not text.isascii():
        position, character = next((i, c) for i, c in enumerate(text) if not c.isascii())
        raise InputError(
            f"image is not valid base64: it holds {character!r} (U+{ord(character):04X}) at "
            f"character {position:,}, and base64 uses only A-Z, a-z, 0-9, +, / (or -, _) and ="
        )
    # The exact decoded size: 3 bytes per 4 characters, padding excluded.
    if len(text.rstrip("=")) * 3 // 4 > max_bytes:
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
