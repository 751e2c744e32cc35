"""A decoded image to metric 3D Gaussians: stage, network forward, unprojection."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.io.checkpoint import load_network
from engine.io.images import DecodedImage
from engine.network import SharpOutput
from engine.runtime.backends import NetworkFn
from engine.runtime.device import resolve_device
from engine.runtime.serving import NetworkRuntime
from engine.runtime.staging import InputStaging
from engine.settings import EngineSettings
from engine.splats.gaussians import Gaussians, postprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    gaussians: Gaussians  # metric camera space, OpenCV axes, on the predictor's device
    image_width: int
    image_height: int
    focal_length_px: float
    focal_length_source: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    backend: str = ""  # the backend that ran this request (it may change while a worker runs)
    precision: str = ""


class SharpPredictor:
    """Runs SHARP on one decoded image at a time. Load once, call `predict` per request.

    `predict` is thread-safe: requests are serialised, since they share the staging buffers
    and the GPU. `poll()` between requests lets a finished engine build take over (see
    engine.runtime.serving).
    """

    def __init__(self, runtime: NetworkRuntime) -> None:
        self.runtime = runtime
        self.network = runtime.network
        self.device = runtime.device
        self.checkpoint = runtime.checkpoint
        self.resolution = self.network.config.internal_resolution
        self._staging = InputStaging(self.resolution, self.device)
        self._stream = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # weights and buffers are in place
            self._stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> SharpPredictor:
        """Load the checkpoint onto the device and start the runtime (eager first, then the
        cached or newly built engine of `settings.backend`)."""
        device = resolve_device(settings.device, setting="SHARP_DEVICE")
        network, info = load_network(settings.checkpoint, cache_dir=settings.cache_dir)
        runtime = NetworkRuntime(network.to(device), device, info, settings)
        runtime.start()
        return cls(runtime)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        settings: EngineSettings | None = None,
    ) -> SharpPredictor:
        """`from_settings` for a checkpoint spec and device; eager unless `settings` say more."""
        base = settings or EngineSettings(backend="eager")
        spec = str(checkpoint) if checkpoint is not None else base.checkpoint
        return cls.from_settings(dataclasses.replace(base, checkpoint=spec, device=str(device)))

    @property
    def backend(self) -> str:
        return self.runtime.active.name

    @property
    def precision(self) -> str:
        return self.runtime.active.precision

    def poll(self) -> bool:
        """Between requests: switch to a newly built engine when one is ready."""
        with self._lock:
            return self.runtime.poll()

    @torch.inference_mode()
    def predict(self, image: DecodedImage) -> Prediction:
        """One decoded image to metric Gaussians, on the predictor's device."""
        timings: dict[str, float] = {}
        caller = torch.cuda.current_stream(self.device) if self._stream is not None else None
        with self._lock, self._on_stream():
            active = self.runtime.active  # read once: a switch applies from the next request
            with self._timed(timings, "inference"):
                output = run_network(active.forward, self._staging, image)
            with self._timed(timings, "postprocess"):
                gaussians = metric_gaussians(output, image)
                if caller is not None:
                    # The caller's stream reads these next: the allocator must not hand their
                    # memory to this stream's next request before that stream is done.
                    for tensor in gaussians.tensors():
                        tensor.record_stream(caller)
        return Prediction(
            gaussians=gaussians,
            image_width=image.width,
            image_height=image.height,
            focal_length_px=image.focal_length_px,
            focal_length_source=image.focal_length_source,
            timings_ms=timings,
            backend=active.name,
            precision=active.precision,
        )

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 to (1, 3, R, R) float in [0, 1], resized as the reference does.

        The plain, allocating form of what `predict` does through its staging buffers.
        """
        pixels = torch.from_numpy(rgb).to(self.device, non_blocking=True)
        pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
        size = (self.resolution, self.resolution)
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=True)

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return (
            torch.cuda.stream(self._stream)
            if self._stream is not None
            else contextlib.nullcontext()
        )

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self._stream is not None:
            # The request's own stream only: a background compile's work must not count.
            self._stream.synchronize()
        timings[stage] = round((time.perf_counter() - start) * 1000, 2)


def network_gaussians(output: SharpOutput, index: int = 0) -> Gaussians:
    """One image's Gaussians from a batched network output, in float32."""
    return Gaussians(
        means=output.means[index].float(),
        scales=output.scales[index].float(),
        quaternions=output.quaternions[index].float(),
        colors=output.colors[index].float(),
        opacities=output.opacities[index].float(),
    )


def run_network(forward: NetworkFn, staging: InputStaging, image: DecodedImage) -> SharpOutput:
    """The network's output for one decoded image: staged to the network input, then run."""
    pixels, disparity_factor = staging.stage(image.rgb, image.focal_length_px / image.width)
    return SharpOutput(*forward(pixels, disparity_factor))


def metric_gaussians(output: SharpOutput, image: DecodedImage) -> Gaussians:
    """The network's output for `image` as metric Gaussians in its camera space."""
    return postprocess(
        network_gaussians(output),
        focal_length_px=image.focal_length_px,
        image_width=image.width,
        image_height=image.height,
    )
