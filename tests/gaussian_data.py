"""Random Gaussians for the format, pruning and geometry tests: one generator, shaped per test.

Every field is drawn from one seeded generator in a fixed order, so a seed names one set.
"""

from __future__ import annotations

import torch

from engine.splats.gaussians import Gaussians


def random_gaussians(
    n: int = 1000,
    seed: int = 0,
    *,
    spread: float = 1.0,
    depth: tuple[float, float] | None = None,
    log_scales: tuple[float, float] = (-9.0, -3.0),
    quaternion_scale: float = 1.0,
    unit_quaternions: bool = False,
    opacities: tuple[float, float] = (0.0, 1.0),
) -> Gaussians:
    """`n` Gaussians: means ~ N(0, spread²) (z uniform in `depth` when given: in front of the
    camera), ln(scale) uniform in `log_scales`, quaternions ~ N(0, quaternion_scale²) (unit
    with w >= 0 when `unit_quaternions`), colours uniform, opacities uniform in `opacities`."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * spread
    if depth is not None:
        near, far = depth
        means[:, 2] = near + (far - near) * torch.rand(n, generator=g)
    low, high = log_scales
    scales = torch.exp(low + (high - low) * torch.rand(n, 3, generator=g))
    quaternions = torch.randn(n, 4, generator=g) * quaternion_scale
    if unit_quaternions:
        quaternions = torch.nn.functional.normalize(quaternions, dim=-1)
        quaternions = quaternions * torch.where(quaternions[:, :1] < 0, -1.0, 1.0)
    lowest, highest = opacities
    return Gaussians(
        means=means,
        scales=scales,
        quaternions=quaternions,
        colors=torch.rand(n, 3, generator=g),
        opacities=lowest + (highest - lowest) * torch.rand(n, generator=g),
    )
