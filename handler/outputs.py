"""Getting the encoded file to the client: inline, or through a bucket URL.

Inline is base64 in the queue's JSON result, or the HTTP response's body itself. Delivery
enforces the inline limit itself: RunPod drops a queue result over its limit yet reports the
job COMPLETED.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any

from engine.settings import BUCKET_ENV
from engine.splats.formats import EncodedSplat, smallest_first

from .storage import ResultBucket


class DeliveryError(ValueError):
    """The result cannot be delivered the way it was asked for; meant for the client."""


# Bytes of the result's other fields (timings, sizes, model, ...: under 2 KB), kept free
# of the inline limit when a .sog is sized to fit it.
RESULT_FIELDS_RESERVE = 4096


def sog_budget(
    delivery: str | None, bucket: ResultBucket | None, max_inline_bytes: int, as_body: bool
) -> int | None:
    """A .sog's byte budget: the file's share of the inline limit when it must go back
    inline (asked for, or no bucket to send it to); None when it goes to a bucket.

    `as_body`: the limit is on the raw bytes of an HTTP response body, not on base64 text."""
    if delivery == "url" or (delivery is None and bucket is not None):
        return None
    if as_body:
        return max_inline_bytes
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
    as_body: bool = False,
) -> dict[str, Any]:
    """The result fields that carry the output: inline base64, or a presigned URL.

    `as_body`: inline means the raw bytes as an HTTP response body, which the caller sends;
    the limit is then on those bytes. `check_deliverable` has run before any work.
    """
    inline_size = len(output.data) if as_body else base64_size(len(output.data))
    fits = inline_size <= max_inline_bytes
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
        limit = (
            f"the response limit of {max_inline_bytes:,} bytes (SHARP_MAX_BODY_BYTES; a "
            "load-balancing endpoint returns at most 30 MB)"
            if as_body
            else f"the inline limit of {max_inline_bytes:,} base64 bytes (SHARP_MAX_INLINE_BYTES; "
            "RunPod returns at most 20 MB per job)"
        )
        raise DeliveryError(_too_large_message(output, limit, bucket is not None))
    if as_body:
        return {"delivery": "inline"}
    return {"delivery": "inline", output.format: base64.b64encode(output.data).decode("ascii")}


def _too_large_message(output: EncodedSplat, limit: str, has_bucket: bool) -> str:
    """The fixes, most useful first: a compact format (a full SHARP result's .sog is sized to
    fit inline), a bucket, then fewer Gaussians."""
    size = len(output.data)
    by_size = smallest_first()  # the same Gaussians in other formats, smallest first
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
        f"{limit}. To get it, " + ", or ".join(remedies) + "."
    )
