"""Turning a prediction into the file the client asked for, and getting it to the client.

Encoding is `engine.splats.formats.encode` (ply, spz, splat), after optional pruning. Delivery
decides between inline base64 and a bucket URL, and enforces the inline limit itself:
RunPod drops a result over its limit yet reports the job COMPLETED.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from engine.splats.formats import FORMATS, EncodedSplat
from engine.splats.formats import encode as encode_splat
from engine.runtime.predictor import Prediction
from engine.splats.pruning import prune

from .settings import BUCKET_ENV
from .storage import ResultBucket

PLY_LAYOUTS = ("standard", "sharp")


@dataclass(frozen=True)
class OutputRequest:
    format: str  # one of FORMATS; also the key of the inline payload ("ply": "<base64>")
    ply_layout: str
    spz_version: int
    max_gaussians: int | None
    min_opacity: float | None


class DeliveryError(ValueError):
    """The result cannot be delivered the way it was asked for; meant for the client."""


def encode(prediction: Prediction, request: OutputRequest) -> tuple[EncodedSplat, int]:
    """The encoded file and how many Gaussians it holds."""
    gaussians = prediction.gaussians
    if request.max_gaussians is not None or request.min_opacity is not None:
        gaussians = prune(
            gaussians,
            min_opacity=request.min_opacity,
            max_gaussians=request.max_gaussians,
            focal_length_px=prediction.focal_length_px,
        )
        if len(gaussians) == 0:
            raise DeliveryError(
                f"min_opacity={request.min_opacity} leaves no Gaussian to return; use a lower value"
            )
    encoded = encode_splat(
        gaussians,
        request.format,
        image_width=prediction.image_width,
        image_height=prediction.image_height,
        focal_length_px=prediction.focal_length_px,
        ply_layout=request.ply_layout,
        spz_version=request.spz_version,
    )
    return encoded, len(gaussians)


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
    output: EncodedSplat,
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
            output.data, job_id=job_id, extension=output.extension, content_type=output.media_type
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


def _too_large_message(output: EncodedSplat, max_inline_bytes: int, has_bucket: bool) -> str:
    size = len(output.data)
    remedies = (
        ["request return='url' (a bucket is configured)"]
        if has_bucket
        else [
            f"configure an S3-compatible bucket ({', '.join(BUCKET_ENV)}, BUCKET_NAME) "
            "to receive it as a presigned URL"
        ]
    )
    smaller = [name for name in FORMATS if name != output.format]
    remedies.append(
        f"request a smaller output: a more compact output_format ({', '.join(smaller)}) "
        "and/or fewer Gaussians (max_gaussians, min_opacity)"
    )
    return (
        f"the {output.format} result is {size:,} bytes ({base64_size(size):,} as base64), over "
        f"the inline limit of {max_inline_bytes:,} base64 bytes (SHARP_MAX_INLINE_BYTES; "
        "RunPod returns at most 20 MB per job). To get it, " + ", or ".join(remedies) + "."
    )
