"""The job pipeline: one job input in, one result (or one client-readable error) out.

The queue worker (the RunPod SDK calls `SharpWorker`) and the HTTP server (`process`) run
the same pipeline: validate, fetch or decode, predict, encode, deliver. Every failure a client can cause comes back as `{"error": message}`, which the RunPod SDK
turns into a FAILED job with that message; the worker itself keeps serving. A CUDA fault
fails its job the same way, once (no retry), and when the GPU is no longer healthy the
result also carries `refresh_worker`, which the SDK turns into `stopPod` so that RunPod
replaces this worker after the job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.io.images import ImageDecodeError, decode_image
from engine.results import EmptyResultError, encode_prediction
from engine.runtime.predictor import SharpPredictor
from engine.settings import Settings
from engine.splats.formats import EncodedSplat
from engine.splats.formats.sog_budget import SogBudgetError

from .fetch import FetchError, FetchPolicy
from .inputs import InputError, JobRequest, image_bytes, parse_request
from .memory import release_free_heap
from .model import gpu_healthy, is_device_fault
from .outputs import DeliveryError, check_deliverable, deliver, sog_budget
from .storage import ResultBucket, UploadError

logger = logging.getLogger(__name__)

CLIENT_ERRORS = (
    InputError,
    FetchError,
    ImageDecodeError,
    EmptyResultError,
    SogBudgetError,
    DeliveryError,
    UploadError,
)

# After a job on an image this large (pixels), the freed host heap is handed back: below it,
# the buffers are small enough that glibc's reuse is the better deal.
RELEASE_HEAP_AFTER_PIXELS = 4_000_000


@dataclass(frozen=True)
class Delivery:
    """How a result reaches the client: inline within `max_inline_bytes`, else by bucket URL.

    `as_body`: inline is the file's bytes as an HTTP response body, not base64 in the result.
    """

    max_inline_bytes: int
    as_body: bool = False


@dataclass(frozen=True)
class Outcome:
    """A job's result as the queue returns it, and what the HTTP server needs beyond it."""

    result: dict[str, Any]  # the success fields, or {"error": message[, "refresh_worker"]}
    output: EncodedSplat | None = None  # the file, when delivered as a body
    error_type: type[BaseException] | None = None  # the failure's class; its message is above

    @property
    def client_error(self) -> bool:
        return self.error_type is not None and issubclass(self.error_type, CLIENT_ERRORS)


class SharpWorker:
    """Callable job handler around a loaded predictor; `runpod.serverless.start` calls it."""

    def __init__(
        self,
        settings: Settings,
        predictor: SharpPredictor,
        bucket: ResultBucket | None,
    ) -> None:
        self.settings = settings.worker
        self.max_pixels = settings.engine.max_pixels
        self.predictor = predictor
        self.bucket = bucket
        self.fetch_policy = FetchPolicy(
            max_bytes=self.settings.max_image_bytes,
            connect_timeout_s=self.settings.url_connect_timeout_s,
            total_timeout_s=self.settings.url_timeout_s,
            allow_private=self.settings.allow_private_urls,
        )

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        queue = Delivery(self.settings.max_inline_bytes)
        return self.process(str(job.get("id", "local")), job.get("input"), queue).result

    def process(
        self,
        job_id: str,
        job_input: Any,
        delivery: Delivery,
        image_data: bytes | None = None,
    ) -> Outcome:
        """One job, start to end; `image_data` is an HTTP request's body, when it is the image."""
        # Between jobs: a finished engine build takes over from here (checked without blocking).
        self.predictor.poll()
        try:
            request = parse_request(job_input, image_data)
            result, output = self.run(job_id, request, delivery)
        except CLIENT_ERRORS as error:
            logger.info("Job %s rejected: %s", job_id, error)
            return Outcome({"error": str(error)}, error_type=type(error))
        except Exception as error:
            if not is_device_fault(error, self.predictor.device):
                logger.exception("Job %s failed", job_id)
                message = f"internal error ({type(error).__name__}): {error}"
                return Outcome({"error": message}, error_type=type(error))
            logger.error("Job %s hit a GPU fault: %s", job_id, error)
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
            message = _device_fault_message(error, out_of_memory)
            error_type = type(error)
        else:
            # `run`'s image, prediction and encode buffers are freed by now; the payload is not.
            size = result["image_size"]
            if size["width"] * size["height"] >= RELEASE_HEAP_AFTER_PIXELS:
                release_free_heap()
            as_body = delivery.as_body and result["delivery"] == "inline"
            return Outcome(result, output if as_body else None)
        # Reached after a GPU fault only, once the traceback and the tensors its frames held
        # are gone, so that emptying the cache can return their memory.
        return Outcome(self._recover(message, out_of_memory), error_type=error_type)

    def run(
        self, job_id: str, request: JobRequest, delivery: Delivery
    ) -> tuple[dict[str, Any], EncodedSplat]:
        timings: dict[str, float] = {}
        check_deliverable(request.delivery, self.bucket)
        with _timed(timings, "input"):
            data = image_bytes(request, self.fetch_policy)
        with _timed(timings, "decode"):
            image = decode_image(
                data, focal_length_px=request.focal_length_px, max_pixels=self.max_pixels
            )
        prediction = self.predictor.predict(image)
        timings.update(
            inference=prediction.timings_ms["inference"],
            postprocess=prediction.timings_ms["postprocess"],
        )
        with _timed(timings, "encode"):
            budget = sog_budget(
                request.delivery, self.bucket, delivery.max_inline_bytes, delivery.as_body
            )
            encoded = encode_prediction(prediction, request.output, budget)
        output = encoded.splat
        with _timed(timings, "deliver"):
            delivered = deliver(
                output,
                delivery=request.delivery,
                max_inline_bytes=delivery.max_inline_bytes,
                bucket=self.bucket,
                job_id=job_id,
                as_body=delivery.as_body,
            )
        result = {
            "status": "success",
            "format": output.format,
            **_format_options(request),
            **delivered,
            "size_bytes": len(output.data),
            "num_gaussians": encoded.num_gaussians,
            "num_gaussians_predicted": len(prediction.gaussians),
            **({"sog_encoding": encoded.sog} if encoded.sog is not None else {}),
            "image_size": {"width": prediction.image_width, "height": prediction.image_height},
            "focal_length_px": prediction.focal_length_px,
            "focal_length_source": prediction.focal_length_source,
            "timings_ms": timings,
            # The request's own: the predictor may switch backend once a compile validates.
            "backend": prediction.backend,
            "precision": prediction.precision,
            "device": str(self.predictor.device),
            "model": {
                "checkpoint": self.predictor.checkpoint.name,
                "untrained": self.predictor.checkpoint.untrained,
            },
        }
        return result, output

    def _recover(self, message: str, out_of_memory: bool) -> dict[str, Any]:
        gc.collect()
        torch.cuda.empty_cache()
        # Out of memory leaves the device usable; any other fault poisons the CUDA context.
        if out_of_memory and gpu_healthy(self.predictor.device):
            return {"error": message}
        logger.error("The GPU is no longer healthy; asking RunPod to replace this worker")
        return {"error": message, "refresh_worker": True}


def _format_options(request: JobRequest) -> dict[str, str | int]:
    if request.output.format == "ply":
        return {"ply_layout": request.output.ply_layout}
    if request.output.format == "spz":
        return {"spz_version": request.output.spz_version}
    return {}


def _device_fault_message(error: BaseException, out_of_memory: bool) -> str:
    if out_of_memory:
        return (
            "the GPU ran out of memory on this image; retry (possibly on a GPU with more "
            "memory) or send a smaller image"
        )
    return f"the GPU failed while processing this job ({error}); retry the job"


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round((time.perf_counter() - start) * 1000, 2)
