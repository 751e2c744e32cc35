"""Base Gaussians from image and depth, and their composition with the predicted deltas.

Shapes follow (batch, channels, layer, height, width). Gaussian means come out in the
network's NDC-like space: (x_ndc * z, y_ndc * z, z), with x_ndc, y_ndc in [-1, 1] over the
image, in units normalized so that the nearest depth is 1 (undone by `global_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.network.color import srgb_to_linear

# Depth normalization: the nearest point is put at depth 1, everything is clamped at 100.
DEPTH_MIN, DEPTH_MAX = 1.0, 100.0
# Per-attribute factors on the deltas (mean xy, mean z, color), fixed by training.
MEAN_DELTA_FACTOR, COLOR_DELTA_FACTOR = 1e-3, 0.1
# Scale multiplier range: (MAX - MIN) * sigmoid(...) + MIN, equal to 1 for a zero delta.
SCALE_MIN, SCALE_MAX = 0.0, 10.0
# Stride between the input pixels and the Gaussian grid.
STRIDE = 2


@dataclass(frozen=True)
class BaseGaussians:
    x_ndc: torch.Tensor  # (B, 1, L, h, w)
    y_ndc: torch.Tensor  # (B, 1, L, h, w)
    disparity: torch.Tensor  # (B, 1, L, h, w), normalized
    scales: torch.Tensor  # (B, 1, L, h, w)
    colors: torch.Tensor  # (B, 3, L, h, w), sRGB of the input
    global_scale: torch.Tensor  # (B,) normalized units -> metric


def normalize_depth(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each image's depth so its minimum is DEPTH_MIN; returns (depth, factor)."""
    factor = DEPTH_MIN / (depth.flatten(1).min(dim=1).values + 1e-6)
    return (depth * factor[:, None, None, None]).clamp(max=DEPTH_MAX), factor


def base_gaussians(image: torch.Tensor, depth: torch.Tensor) -> tuple[BaseGaussians, torch.Tensor]:
    """One Gaussian per layer and 2x2 pixel block, on the nearest surface of each layer.

    Returns the base Gaussians and the decoder's input (image and normalized disparity,
    mapped to [-1, 1]).
    """
    batch, num_layers, height, width = depth.shape
    depth, factor = normalize_depth(depth)
    # Max-pooled disparity keeps the nearest surface within each block.
    disparity = F.max_pool2d(1.0 / depth, STRIDE, STRIDE)[:, None]

    device, dtype = depth.device, depth.dtype
    xs = torch.arange(0.5 * STRIDE, width, STRIDE, device=device, dtype=dtype) * (2 / width) - 1
    ys = torch.arange(0.5 * STRIDE, height, STRIDE, device=device, dtype=dtype) * (2 / height) - 1
    grid_shape = (batch, 1, num_layers, ys.shape[0], xs.shape[0])
    x_ndc = xs[None, :].expand(grid_shape)
    y_ndc = ys[:, None].expand(grid_shape)

    # A Gaussian initially covers its block: size STRIDE pixels at its depth, in NDC units.
    scales = (1.0 / disparity) * (2.0 * STRIDE / width)
    colors = F.avg_pool2d(image, STRIDE, STRIDE)[:, :, None].expand(-1, -1, num_layers, -1, -1)
    base = BaseGaussians(x_ndc, y_ndc, disparity, scales, colors, 1.0 / factor)
    decoder_input = torch.cat([image, 1.0 / depth], dim=1) * 2.0 - 1.0
    return base, decoder_input


def inverse_softplus(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.clamp_min(eps)
    return x + torch.log(-torch.expm1(-x))


_SCALE_SLOPE = (SCALE_MAX - SCALE_MIN) / (1 - SCALE_MIN) / (SCALE_MAX - 1)
_SCALE_OFFSET = math.log((1 - SCALE_MIN) / (SCALE_MAX - 1))  # logit((1 - min) / (max - min))


def compose(base: BaseGaussians, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply the deltas (B, 14, L, h, w) to the base Gaussians.

    Returns metric (means, scales, quaternions, colors, opacities), flattened over
    (layer, row, column): (B, N, 3), (B, N, 3), (B, N, 4), (B, N, 3), (B, N).
    """
    x = base.x_ndc + MEAN_DELTA_FACTOR * delta[:, 0:1]
    y = base.y_ndc + MEAN_DELTA_FACTOR * delta[:, 1:2]
    inverse_z = F.softplus(inverse_softplus(base.disparity) + MEAN_DELTA_FACTOR * delta[:, 2:3])
    z = 1.0 / (inverse_z + 1e-3)
    means = torch.cat([z * x, z * y, z], dim=1)

    # The base scale follows the Gaussian when its depth moves.
    base_scales = base.scales * base.disparity * z
    scales = base_scales * (
        (SCALE_MAX - SCALE_MIN) * torch.sigmoid(_SCALE_SLOPE * delta[:, 3:6] + _SCALE_OFFSET)
        + SCALE_MIN
    )
    quaternions = delta[:, 6:10] + torch.tensor([1.0, 0.0, 0.0, 0.0], device=delta.device).view(
        1, 4, 1, 1, 1
    )
    base_colors = base.colors.clamp(0.01, 0.99)
    colors = srgb_to_linear(
        torch.sigmoid(torch.logit(base_colors) + COLOR_DELTA_FACTOR * delta[:, 10:13])
    )
    # Base opacity min(1 / L, 0.5) keeps the initial transmittance near 1/e for any L.
    num_layers = delta.shape[2]
    base_opacity = min(1.0 / num_layers, 0.5)
    opacities = torch.sigmoid(math.log(base_opacity / (1 - base_opacity)) + delta[:, 13])

    def flatten(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 4, 1).flatten(1, 3)

    scale = base.global_scale[:, None, None]
    return (
        scale * flatten(means),
        scale * flatten(scales),
        flatten(quaternions),
        flatten(colors),
        opacities.flatten(1, 3),
    )
