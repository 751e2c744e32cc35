"""Image bytes to metric 3D Gaussians: decode, resize, network forward, unprojection."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointInfo, load_network
from .gaussians import Gaussians, postprocess
from .images import DecodedImage, decode_image
from .network import SharpNetwork, SharpOutput

logger = logging.getLogger(__name__)

NetworkFn = Callable[[torch.Tensor, torch.Tensor], SharpOutput]


@dataclass(frozen=True)
class Prediction:
    gaussians: Gaussians  # metric camera space, OpenCV axes, on the predictor's device
    image_width: int
    image_height: int
    focal_length_px: float
    focal_length_source: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when it works, else the CPU; an explicit `cuda` must work."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this host")
    return device


class SharpPredictor:
    """Runs SHARP on one image at a time. Load once, call `predict` per request."""

    def __init__(
        self,
        network: SharpNetwork,
        device: torch.device,
        checkpoint: CheckpointInfo,
        backend: str = "eager",
        precision: str = "fp32",
        forward: NetworkFn | None = None,
    ) -> None:
        self.network = network
        self.device = device
        self.checkpoint = checkpoint
        self.backend = backend
        self.precision = precision
        # The compiled backends swap in their own forward; the eager network is the fallback.
        self.forward: NetworkFn = forward or network
        self.resolution = network.config.internal_resolution

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto"
    ) -> SharpPredictor:
        device = resolve_device(device)
        network, info = load_network(checkpoint)
        return cls(network.to(device), device, info)

    @torch.inference_mode()
    def predict(
        self, image: bytes | DecodedImage, *, focal_length_px: float | None = None
    ) -> Prediction:
        timings: dict[str, float] = {}
        with self._timed(timings, "decode"):
            if isinstance(image, (bytes, bytearray, memoryview)):
                image = decode_image(bytes(image), focal_length_px=focal_length_px)
            elif focal_length_px is not None:
                raise ValueError("pass focal_length_px to decode_image for a decoded image")
        with self._timed(timings, "inference"):
            pixels = self.preprocess(image.rgb)
            disparity_factor = torch.tensor(
                [image.focal_length_px / image.width], dtype=torch.float32, device=self.device
            )
            output = self.forward(pixels, disparity_factor)
        with self._timed(timings, "postprocess"):
            gaussians = postprocess(
                network_gaussians(output),
                focal_length_px=image.focal_length_px,
                image_width=image.width,
                image_height=image.height,
            )
        return Prediction(
            gaussians=gaussians,
            image_width=image.width,
            image_height=image.height,
            focal_length_px=image.focal_length_px,
            focal_length_source=image.focal_length_source,
            timings_ms=timings,
        )

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 to (1, 3, R, R) float in [0, 1], resized as the reference does."""
        pixels = torch.from_numpy(rgb).to(self.device, non_blocking=True)
        pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
        size = (self.resolution, self.resolution)
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=True)

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
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
