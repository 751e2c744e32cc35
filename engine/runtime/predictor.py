"""Image bytes to metric 3D Gaussians: decode, stage, network forward, unprojection."""

from __future__ import annotations

import contextlib
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

from engine.io.checkpoint import CheckpointInfo, load_network
from engine.io.images import DecodedImage, decode_image
from engine.network import SharpNetwork, SharpOutput
from engine.runtime import staging
from engine.runtime.backends import (
    BackendContext,
    BackendRuntime,
    BackendSettings,
    EagerBackend,
    candidate_backends,
)
from engine.splats.gaussians import Gaussians, postprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    gaussians: (
        Gaussians  # metric camera space, OpenCV axes; on the predictor's device unless to_host
    )
    image_width: int
    image_height: int
    focal_length_px: float
    focal_length_source: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    backend: str = ""  # the backend that ran this request (it may change while a worker runs)
    precision: str = ""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when it works, else the CPU; an explicit `cuda` must work."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this host")
    return device


class SharpPredictor:
    """Runs SHARP on one image at a time. Load once, call `predict` per request.

    `predict` is thread-safe: requests are serialised, since they share the staging buffers
    and the GPU. The backend may switch between requests when a background compile passes
    validation; `backend_report` says what was tried and why each was used or refused.
    """

    def __init__(
        self,
        network: SharpNetwork,
        device: torch.device,
        checkpoint: CheckpointInfo,
        runtime: BackendRuntime | None = None,
    ) -> None:
        self.network = network
        self.device = device
        self.checkpoint = checkpoint
        if runtime is None:  # plain eager fp32, nothing to validate
            settings = BackendSettings(backend="eager", precision="fp32")
            runtime = BackendRuntime(
                BackendContext(network, device, settings, checkpoint), [EagerBackend("fp32")]
            )
            runtime.start()
        self.runtime = runtime
        self.resolution = network.config.internal_resolution
        self._staging = staging.InputStaging(self.resolution, device)
        self._stream = None
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # weights and buffers are in place
            self._stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        *,
        backend: str | None = None,
        precision: str | None = None,
        settings: BackendSettings | None = None,
    ) -> SharpPredictor:
        """Load the checkpoint and choose a backend (see `engine.runtime.backends`).

        backend/precision default to SHARP_BACKEND / SHARP_PRECISION (auto; fp16 on CUDA, fp32
        on the CPU); `settings` replaces the environment altogether.
        """
        device = resolve_device(device)
        network, info = load_network(checkpoint)
        if settings is None:
            settings = BackendSettings.from_env(backend=backend, precision=precision)
        return cls.from_network(network, device, info, settings)

    @classmethod
    def from_network(
        cls,
        network: SharpNetwork,
        device: torch.device,
        checkpoint: CheckpointInfo,
        settings: BackendSettings,
    ) -> SharpPredictor:
        """A predictor for a network already built (moved to `device` here)."""
        network = network.to(device)
        runtime = BackendRuntime(
            BackendContext(network, device, settings, checkpoint),
            candidate_backends(settings, device),
        )
        runtime.start()
        return cls(network, device, checkpoint, runtime)

    @property
    def backend(self) -> str:
        return self.runtime.active.name

    @property
    def precision(self) -> str:
        return self.runtime.active.precision

    @property
    def backend_report(self) -> list[dict[str, Any]]:
        """JSON-ready: backend, precision, status (active | superseded | refused | pending |
        loading | skipped), reason, max_errors, seconds, plan, and block_errors where measured."""
        return self.runtime.report

    def wait_for_backend(self, timeout: float | None = None) -> bool:
        """Block until a background compile has finished (or `timeout`); True when it has."""
        return self.runtime.wait(timeout)

    @torch.inference_mode()
    def predict(
        self,
        image: bytes | DecodedImage,
        *,
        focal_length_px: float | None = None,
        to_host: bool = False,
    ) -> Prediction:
        """One image to metric Gaussians. to_host: return them in pinned host memory."""
        timings: dict[str, float] = {}
        with self._timed(timings, "decode"):
            if isinstance(image, (bytes, bytearray, memoryview)):
                image = decode_image(bytes(image), focal_length_px=focal_length_px)
            elif focal_length_px is not None:
                raise ValueError("pass focal_length_px to decode_image for a decoded image")
        caller = torch.cuda.current_stream(self.device) if self._stream is not None else None
        with self._lock, self._on_stream():
            active = self.runtime.active  # read once: a switch applies from the next request
            with self._timed(timings, "inference"):
                pixels, disparity_factor = self._staging.stage(
                    image.rgb, image.focal_length_px / image.width
                )
                output = active.forward(pixels, disparity_factor)
            with self._timed(timings, "postprocess"):
                gaussians = postprocess(
                    network_gaussians(output),
                    focal_length_px=image.focal_length_px,
                    image_width=image.width,
                    image_height=image.height,
                )
                if to_host:
                    gaussians = staging.to_host(gaussians)
                elif caller is not None:
                    # The caller's stream reads these next: the allocator must not hand their
                    # memory to this stream's next request before that stream is done.
                    for tensor in (
                        gaussians.means,
                        gaussians.scales,
                        gaussians.quaternions,
                        gaussians.colors,
                        gaussians.opacities,
                    ):
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
