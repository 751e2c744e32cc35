"""Turning a prediction into the file the client asked for, and getting it to the client.

Encoding is `engine.splats.formats.encode` (ply, spz, splat, sog), after optional pruning. Delivery
decides between inline base64 and a bucket URL, and enforces the inline limit itself:
RunPod drops a result over its limit yet reports the job COMPLETED.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any

from engine.results import EmptyResultError, EncodedResult, OutputOptions, encode_prediction
from engine.runtime.predictor import Prediction
from engine.settings import BUCKET_ENV
from engine.splats.formats import FORMATS, EncodedSplat
from engine.splats.formats.sog_budget import SogBudgetError

from .storage import ResultBucket


class DeliveryError(ValueError):
    """The result cannot be delivered the way it was asked for; meant for the client."""


# Bytes of the result's other fields (timings, sizes, model, ...: under 2 KB), kept free
# of the inline limit when a .sog is sized to fit it.
RESULT_FIELDS_RESERVE = 4096


def encode(
    prediction: Prediction, options: OutputOptions, max_bytes: int | None = None
) -> EncodedResult:
    """The encoded file, how many Gaussians it holds, and a .sog's precision."""
    try:
        return encode_prediction(prediction, options, max_bytes)
    except (EmptyResultError, SogBudgetError) as error:
        raise DeliveryError(str(error)) from None


def sog_budget(
    delivery: str | None, bucket: ResultBucket | None, max_inline_bytes: int
) -> int | None:
    """A .sog's byte budget: the file's share of the inline limit when it must go back
    inline (asked for, or no bucket to send it to); None when it goes to a bucket."""
    if delivery == "url" or (delivery is None and bucket is not None):
        return None
    return max(0, (max_inline_bytes - RESULT_FIELDS_RESERVE) // 4 * 3)


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
    """The fixes, most useful first: a compact format (a full SHARP result is ~8 MB as .sog,
    which fits inline), a bucket, then fewer Gaussians."""
    size = len(output.data)
    # Smaller formats for the same Gaussians, smallest first; bytes a Gaussian: sog ~7,
    # spz ~8.5, splat 32, ply 56.
    by_size = [name for name in ("sog", "spz", "splat", "ply") if name in FORMATS]
    smaller = by_size[: by_size.index(output.format)] if output.format in by_size else by_size
    remedies = [f'request output_format: "{name}"' for name in smaller[:1]]
    if smaller[1:]:
        remedies[0] += f" (or {', '.join(smaller[1:])})"
    remedies.append(
        "request return='url' (a bucket is configured)"
        if has_bucket
        else f"configure an S3-compatible bucket ({', '.join(BUCKET_ENV)}, BUCKET_NAME) "
        "to receive it as a presigned URL"
    )
    remedies.append("request fewer Gaussians (max_gaussians, min_opacity)")
    return (
        f"the {output.format} result is {size:,} bytes ({base64_size(size):,} as base64), over "
        f"the inline limit of {max_inline_bytes:,} base64 bytes (SHARP_MAX_INLINE_BYTES; "
        "RunPod returns at most 20 MB per job). To get it, " + ", or ".join(remedies) + "."
    )
