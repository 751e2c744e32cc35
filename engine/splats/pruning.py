"""Pruning: drop Gaussians that contribute little to the picture, to shrink downloads.

`prune` keeps the Gaussians at or above an opacity threshold and/or the `max_gaussians` with
the largest `importance`, always in their original order, so the result (and any file written
from it) is deterministic. `len()` of the result says how many were kept.
"""

from __future__ import annotations

import math
import operator

import torch

from engine.splats.gaussians import Gaussians

# The low-pass filter viewers apply: 0.3 px² added to the diagonal of each projected covariance
# (3DGS, gsplat's eps2d, antimatter15 and Spark), so nothing renders smaller than about a pixel.
VIEWER_DILATION_PX2 = 0.3


def prune(
    gaussians: Gaussians,
    *,
    min_opacity: float | None = None,
    max_gaussians: int | None = None,
    focal_length_px: float | None = None,
) -> Gaussians:
    """The Gaussians with opacity >= `min_opacity`, then at most `max_gaussians` of those.

    With more than `max_gaussians` left, keeps those of largest `importance` (which needs
    `focal_length_px`); of Gaussians tied at the cut, the lower indices. Kept Gaussians stay
    in their original order.
    """
    keep = torch.ones(len(gaussians), dtype=torch.bool, device=gaussians.opacities.device)
    if min_opacity is not None:
        if not 0 <= min_opacity <= 1:
            raise ValueError(f"min_opacity must be in [0, 1], got {min_opacity}")
        keep &= gaussians.opacities >= min_opacity
    if max_gaussians is not None:
        k = _positive_int(max_gaussians)
        focal_length_px = _focal_length(focal_length_px)
        if int(keep.sum()) > k:
            scores = importance(gaussians, focal_length_px=focal_length_px)
            keep &= _top_k_mask(torch.where(keep, scores, -math.inf), k)
    return gaussians if bool(keep.all()) else gaussians.index(keep)


def importance(gaussians: Gaussians, *, focal_length_px: float) -> torch.Tensor:
    """Each Gaussian's expected contribution to the input view: opacity x rendered footprint.

    A Gaussian splats opacity * exp(-d^T S^-1 d / 2) over the image, where S is its projected
    covariance in pixels plus the viewers' dilation; summed over the image that is
    2 pi opacity sqrt(det S), its share of the picture before occlusion, which is what removing
    it takes away. This is the measure here, without the constant 2 pi:
    opacity * sqrt(det S) in px². It refines "opacity x pi s_a s_b f^2 / z^2" with the exact
    perspective projection (the cross-section the Gaussian shows along its viewing ray,
    and the obliquity off axis) and the one-pixel floor that viewers render at.

    With the Jacobian J = (f / z) [[1, 0, -x/z], [0, 1, -y/z]] and Σ = R diag(s²) Rᵀ:
    det(J Σ Jᵀ) = f⁴ / z⁶ · μᵀ adj(Σ) μ = f⁴ / z⁶ · Σ_k (s_i s_j)² (r_k · μ)², since the rows
    of J cross to (f/z)² μ / z; tr(J Σ Jᵀ) = (f / z)² Σ_k s_k² ((r_k · a₁)² + (r_k · a₂)²) for
    the rows a₁, a₂ of J z / f; and det(J Σ Jᵀ + εI) = det + ε tr + ε². Gaussians at z <= 0
    are behind the camera and score 0.
    """
    mx, my, mz = gaussians.means.T.contiguous()
    scales = gaussians.scales.T.contiguous()
    depth = mz.clamp_min(torch.finfo(mz.dtype).tiny)
    u, v = mx / depth, my / depth
    det_sum = trace_sum = torch.zeros_like(mz)
    for k, (r0, r1, r2) in enumerate(_rotation_columns(gaussians.quaternions)):
        across = scales[(k + 1) % 3] * scales[(k + 2) % 3]  # s_i s_j
        det_sum = det_sum + (across * (r0 * mx + r1 * my + r2 * mz)).square()
        trace_sum = trace_sum + scales[k].square() * (
            (r0 - u * r2).square() + (r1 - v * r2).square()
        )
    focal_over_z2 = (focal_length_px / depth).square()
    det = focal_over_z2.square() / depth.square() * det_sum
    trace = focal_over_z2 * trace_sum
    eps = VIEWER_DILATION_PX2
    footprint = torch.sqrt(det + eps * trace + eps * eps)
    return torch.where(mz > 0, gaussians.opacities * footprint, 0.0)


def _rotation_columns(quaternions: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The columns r_k = (R_0k, R_1k, R_2k) of the rotations of (w, x, y, z) quaternions."""
    w, x, y, z = torch.nn.functional.normalize(quaternions, dim=-1).T.contiguous()
    return (
        (1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)),
        (2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x)),
        (2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)),
    )


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest scores; of those tied with the k-th, the first by index.

    torch.topk leaves the choice among ties unspecified; selecting by the k-th value makes it
    deterministic on every device.
    """
    kth = torch.kthvalue(scores, len(scores) - k + 1).values
    above = scores > kth
    tied = scores == kth
    return above | (tied & (tied.cumsum(0) <= k - above.sum()))


def _positive_int(value: int) -> int:
    try:
        k = operator.index(value)
    except TypeError:
        raise ValueError(f"max_gaussians must be an integer >= 1, got {value!r}") from None
    if k < 1:
        raise ValueError(f"max_gaussians must be an integer >= 1, got {k}")
    return k


def _focal_length(focal_length_px: float | None) -> float:
    if focal_length_px is None or not 0 < focal_length_px < math.inf:
        raise ValueError(
            f"max_gaussians ranks by screen footprint: it needs a positive focal_length_px, "
            f"got {focal_length_px}"
        )
    return float(focal_length_px)
