"""Moving request images to the network input, and results back, without per-request allocation.

On CUDA an image goes host -> page-locked (pinned) buffer -> device on the predictor's stream,
is converted to float and resized straight into the preallocated network input. The buffers
grow, to the next power of two, only when an image is larger than every one before, so a
steady stream of requests allocates nothing. On the CPU the same steps run without pinning.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engine.splats.gaussians import Gaussians


class InputStaging:
    """Owns the network's fixed (1, 3, R, R) float32 input and the buffers that feed it.

    Not thread-safe: the predictor calls it under its request lock, and the returned tensors
    are overwritten by the next `stage`.
    """

    def __init__(self, resolution: int, device: torch.device) -> None:
        self.device = device
        self.resolution = resolution
        self.pinned = device.type == "cuda"
        self.network_input = torch.empty(1, 3, resolution, resolution, device=device)
        self.disparity_factor = torch.empty(1, device=device)
        self._host_factor = torch.empty(1, pin_memory=self.pinned)
        self._host_bytes = torch.empty(0, dtype=torch.uint8, pin_memory=self.pinned)
        self._device_bytes = torch.empty(0, dtype=torch.uint8, device=device)
        self._device_floats = torch.empty(0, device=device)

    @property
    def capacity(self) -> int:
        """Values (height * width * 3) the buffers hold without growing."""
        return self._device_floats.numel()

    def stage(self, rgb: np.ndarray, disparity_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 to the network input, resized as the reference does; async on CUDA."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
        height, width, _ = rgb.shape
        size = rgb.size
        self._reserve(size)
        if self.pinned:
            host = self._host_bytes[:size]
            np.copyto(host.numpy(), rgb.reshape(-1))
            source = self._device_bytes[:size]
            source.copy_(host, non_blocking=True)
            source = source.view(height, width, 3)
        else:
            source = torch.from_numpy(np.ascontiguousarray(rgb))
        # Same ops and memory layout as `tensor.float() / 255` on the HWC image permuted to CHW.
        pixels = self._device_floats[:size].view(height, width, 3)
        pixels.copy_(source)
        pixels.div_(255.0)
        torch._C._nn.upsample_bilinear2d(
            pixels.permute(2, 0, 1)[None],
            (self.resolution, self.resolution),
            True,  # align_corners, as the reference's resize
            None,
            None,
            out=self.network_input,
        )
        self._host_factor[0] = disparity_factor
        self.disparity_factor.copy_(self._host_factor, non_blocking=self.pinned)
        return self.network_input, self.disparity_factor

    def _reserve(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = 1 << (size - 1).bit_length()
        if self.pinned:
            self._host_bytes = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
            self._device_bytes = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self._device_floats = torch.empty(capacity, device=self.device)


def to_host(gaussians: Gaussians) -> Gaussians:
    """Gaussians in page-locked host memory, copied asynchronously on the current stream.

    The caller synchronizes the stream before reading them. The memory comes from PyTorch's
    caching host allocator: a block freed by an earlier request is reused rather than
    allocated again, and results may outlive the next request (a reused fixed buffer could not).
    """
    if gaussians.means.device.type != "cuda":
        return gaussians
    copies = {}
    for field in dataclasses.fields(gaussians):
        tensor = getattr(gaussians, field.name)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        copies[field.name] = host.copy_(tensor, non_blocking=True)
    return Gaussians(**copies)
