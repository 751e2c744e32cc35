"""Moving request images to the network input with a bounded footprint.

On CUDA an image goes host -> page-locked (pinned) buffer -> device on the predictor's stream,
is converted to float and resized straight into the preallocated network input. The buffers
that persist between requests grow, to the next power of two, only when an image is larger
than every one before, and never past a cap (`DEFAULT_PERSISTENT_PIXELS`, a 12 MP phone
photo): a steady stream of requests up to the cap allocates nothing. A larger image gets a
float buffer of its own for that request, released after it (back to the caching allocator),
and its bytes pass through the persistent buffers in cap-sized chunks, so no pinned memory
(which the caching host allocator never returns) is taken for it. On the CPU the same steps
run without pinning, and the image is read in place rather than through the byte buffers.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch

# 4032 x 3024, the 12.2 MP a phone's main camera writes by default (iPhone, Pixel, Galaxy in
# their default modes), so the common request stays allocation-free. At that cap the buffers
# hold 36.6 MB pinned + 36.6 MB device bytes + 146 MB device floats, against 768 MB that a
# single 24-40 MP image (2**27 values) left held forever when growth was unbounded.
DEFAULT_PERSISTENT_PIXELS: Final[int] = 4032 * 3024


class InputStaging:
    """Owns the network's fixed (1, 3, R, R) float32 input and the buffers that feed it.

    Not thread-safe: the predictor calls it under its request lock, and the returned tensors
    are overwritten by the next `stage`.

    Args:
        resolution: R, the network's square input side.
        device: where the network runs.
        max_persistent_pixels: the largest image (width x height) whose buffers persist.
        through_buffers: copy the bytes through the host and device byte buffers (pinned on
            CUDA). Default: on CUDA only; on the CPU it is an extra copy, here for testing the
            CUDA logic where there is no GPU.
    """

    def __init__(
        self,
        resolution: int,
        device: torch.device,
        *,
        max_persistent_pixels: int = DEFAULT_PERSISTENT_PIXELS,
        through_buffers: bool | None = None,
    ) -> None:
        if max_persistent_pixels < 1:
            raise ValueError(f"max_persistent_pixels must be >= 1, got {max_persistent_pixels}")
        self.device = device
        self.resolution = resolution
        self.max_capacity = 3 * max_persistent_pixels
        self._cuda = device.type == "cuda"
        self.through_buffers = self._cuda if through_buffers is None else through_buffers
        self.pinned = self._cuda and self.through_buffers
        self.network_input = torch.empty(1, 3, resolution, resolution, device=device)
        self.disparity_factor = torch.empty(1, device=device)
        self._host_factor = torch.empty(1, pin_memory=self.pinned)
        self._host_bytes = torch.empty(0, dtype=torch.uint8, pin_memory=self.pinned)
        self._device_bytes = torch.empty(0, dtype=torch.uint8, device=device)
        self._device_floats = torch.empty(0, device=device)
        # Marks the last copy out of the pinned buffers: they are rewritten only after it.
        self._host_read = torch.cuda.Event() if self._cuda else None
        self.oversize_stagings = 0  # images staged through a buffer of their own

    @property
    def capacity(self) -> int:
        """Values (height * width * 3) the persistent buffers hold; at most `max_capacity`."""
        return self._device_floats.numel()

    @property
    def persistent_bytes(self) -> int:
        """Bytes held between requests by the growable buffers (host, device bytes, floats)."""
        buffers = (self._host_bytes, self._device_bytes, self._device_floats)
        return sum(buffer.numel() * buffer.element_size() for buffer in buffers)

    def stage(self, rgb: np.ndarray, disparity_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 to the network input, resized as the reference does; async on CUDA."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
        height, width, _ = rgb.shape
        size = rgb.size
        self._wait_host_read()
        self._reserve(size)
        if size <= self.capacity:
            floats = self._device_floats[:size]
        else:
            # Dropped when this call returns; on CUDA the caching allocator orders its reuse
            # after the resize below, which is queued on the same stream.
            floats = torch.empty(size, device=self.device)
            self.oversize_stagings += 1
        flat = np.ascontiguousarray(rgb).reshape(-1)
        if self.through_buffers:
            self._copy_through_buffers(flat, floats)
        else:
            floats.copy_(torch.from_numpy(flat))
        # Same ops and memory layout as `tensor.float() / 255` on the HWC image permuted to CHW.
        pixels = floats.view(height, width, 3)
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
        self._record_host_read()
        return self.network_input, self.disparity_factor

    def _copy_through_buffers(self, flat: np.ndarray, floats: torch.Tensor) -> None:
        """uint8 values to floats via the byte buffers, in chunks of their capacity.

        An image under the cap is one chunk. The uint8 -> float conversion is elementwise,
        so converting chunk by chunk gives the same values as converting the whole image.
        """
        chunk = self._host_bytes.numel()
        for start in range(0, flat.size, chunk):
            count = min(chunk, flat.size - start)
            if start:
                self._wait_host_read()  # the previous chunk's copy must have read the buffer
            host = self._host_bytes[:count]
            np.copyto(host.numpy(), flat[start : start + count])
            device_bytes = self._device_bytes[:count]
            device_bytes.copy_(host, non_blocking=self.pinned)
            self._record_host_read()
            # Queued after this copy and before the next chunk's, on the same stream.
            floats[start : start + count].copy_(device_bytes)

    def _reserve(self, size: int) -> None:
        capacity = min(1 << (size - 1).bit_length(), self.max_capacity)
        if capacity <= self.capacity:
            return
        # Drop the old buffers first, so that the old and new do not coexist at the peak.
        self._device_floats = torch.empty(0, device=self.device)
        if self.through_buffers:
            self._host_bytes = self._device_bytes = torch.empty(0, dtype=torch.uint8)
            self._host_bytes = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)
            self._device_bytes = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self._device_floats = torch.empty(capacity, device=self.device)

    def _record_host_read(self) -> None:
        if self._host_read is not None:
            self._host_read.record(torch.cuda.current_stream(self.device))

    def _wait_host_read(self) -> None:
        # A no-op before the first record, and when the copies have already run.
        if self._host_read is not None:
            self._host_read.synchronize()
