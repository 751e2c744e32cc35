"""3D Gaussians as the service passes them around, and their geometric post-processing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gaussians:
    """N Gaussians in one coordinate frame (OpenCV axes: x right, y down, z forward).

    All tensors share one device; float32 unless stated.
    """

    means: torch.Tensor  # (N, 3)
    scales: torch.Tensor  # (N, 3) standard deviations along the principal axes (> 0)
    quaternions: torch.Tensor  # (N, 4) rotation as (w, x, y, z), not necessarily unit length
    colors: torch.Tensor  # (N, 3) linear RGB in 0..1
    opacities: torch.Tensor  # (N,) in 0..1

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str) -> Gaussians:
        return Gaussians(*(t.to(device) for t in self._tensors()))

    def index(self, keep: torch.Tensor) -> Gaussians:
        """The subset selected by a boolean mask or an index tensor."""
        return Gaussians(*(t[keep] for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.means, self.scales, self.quaternions, self.colors, self.opacities)
