"""Turning a prediction into the bytes the client asked for, and getting them to the client.

Encoding is one table of encoders keyed by `output_format`; a new format (spz, splat, ...)
is one more entry. Delivery decides between inline base64 and a bucket URL, and enforces the
inline limit itself: RunPod drops a result over its limit yet reports the job COMPLETED.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from engine.pipeline import Prediction
from engine.ply import write_ply

from .settings import BUCKET_ENV
from .storage import ResultBucket

PLY_LAYOUTS = ("standard", "sharp")


@dataclass(frozen=True)
class EncodedOutput:
    data: bytes
    format: str  # also the key of the inline payload in the result ("ply": "<base64>")
    extension: str
    content_type: str


def _encode_ply(prediction: Prediction, ply_layout: str) -> EncodedOutput:
    data = write_ply(
        prediction.gaussians,
        image_width=prediction.image_width,
        image_height=prediction.image_height,
        focal_length_px=prediction.focal_length_px,
        layout=ply_layout,
    )
    return EncodedOutput(data, "ply", ".ply", "application/octet-stream")


_ENCODERS: dict[str, Callable[[Prediction, str], EncodedOutput]] = {"ply": _encode_ply}
FORMATS = tuple(_ENCODERS)


def encode(prediction: Prediction, output_format: str, ply_layout: str) -> EncodedOutput:
    return _ENCODERS[output_format](prediction, ply_layout)


class DeliveryError(ValueError):
    """The result cannot be delivered the way it was asked for; meant for the client."""


def base64_size(num_bytes: int) -> int:
    return 4 * -(-num_bytes // 3)


def check_deliverable(delivery: str | None, bucket: ResultBucket | None) -> None:
    """Refuse return='url' without a bucket before any work is spent on the job."""
    if delivery == "url" and bucket is None:
        raise DeliveryError(
            f"return='url' needs an S3-compatible bucket, and none is configured: set "
            f"{', '.join(BUCKET_ENV)} (and BUCKET_NAME) on the endpoint, or leave return unset"
        )


def deliver(
    output: EncodedOutput,
    *,
    delivery: str | None,
    max_inline_bytes: int,
    bucket: ResultBucket | None,
    job_id: str,
) -> dict[str, Any]:
    """The result fields that carry the output: inline base64, or a presigned URL."""
    check_deliverable(delivery, bucket)
    fits = base64_size(len(output.data)) <= max_inline_bytes
    if bucket is not None and (delivery == "url" or (delivery is None and not fits)):
        uploaded = bucket.upload(
            output.data, job_id=job_id, extension=output.extension, content_type=output.content_type
        )
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=uploaded.expires_in_s)
        return {
            "delivery": "url",
            f"{output.format}_url": uploaded.url,
            "url_expires_in_s": uploaded.expires_in_s,
            "url_expires_at": expires_at.isoformat(timespec="seconds"),
        }
    if not fits:
        raise DeliveryError(_too_large_message(output, max_inline_bytes, bucket is not None))
    return {"delivery": "inline", output.format: base64.b64encode(output.data).decode("ascii")}


def _too_large_message(output: EncodedOutput, max_inline_bytes: int, has_bucket: bool) -> str:
    size = len(output.data)
    remedies = (
        ["request return='url' (a bucket is configured)"]
        if has_bucket
        else [f"configure an S3-compatible bucket ({', '.join(BUCKET_ENV)}, BUCKET_NAME) "
              "to receive it as a presigned URL"]
    )
    smaller = [name for name in FORMATS if name != output.format]
    if smaller:
        remedies.append(f"request a more compact output_format ({', '.join(smaller)})")
    return (
        f"the {output.format} result is {size:,} bytes ({base64_size(size):,} as base64), over "
        f"the inline limit of {max_inline_bytes:,} base64 bytes (SHARP_MAX_INLINE_BYTES; "
        "RunPod returns at most 20 MB per job). To get it, " + ", or ".join(remedies) + "."
    )
