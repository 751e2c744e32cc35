"""Conventions the compact splat formats share: colours, quaternions and C-style quantization.

Colours follow the .ply export (and Apple's reference `save_ply`): SHARP predicts linear RGB,
but public viewers blend the stored colours as they are, so every format stores sRGB, as the
degree-0 spherical-harmonics coefficient sh0 = (srgb - 0.5) / SH_C0 where a format wants one.
All arithmetic is float32, like the reference C++ and JavaScript encoders.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.network.color import linear_to_srgb, srgb_to_linear
from engine.splats.gaussians import Gaussians

# Y_0^0 = 1 / (2 sqrt(pi)): colour = 0.5 + SH_C0 * sh0 for a degree-0 splat.
SH_C0 = 0.28209479177387814


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 NumPy array on the CPU (a view when the tensor already is one).

    The pipeline's tensors are strided views of the network's output (a column of an (N, 14)
    block, a transposed layout), and the writers reinterpret bytes with `.view`, which needs
    C order: every writer reads its tensors through here, so any layout is accepted.
    """
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def srgb_colors(gaussians: Gaussians) -> np.ndarray:
    """(N, 3) sRGB colours, computed on the Gaussians' device."""
    return to_numpy(linear_to_srgb(gaussians.colors))


def sh0_from_linear(colors: torch.Tensor) -> torch.Tensor:
    """Degree-0 spherical-harmonics coefficients of linear colours, on their device."""
    return (linear_to_srgb(colors) - 0.5) / SH_C0


def dc_coefficients(srgb: np.ndarray) -> np.ndarray:
    """Degree-0 spherical-harmonics coefficients of sRGB colours."""
    return (srgb - np.float32(0.5)) / np.float32(SH_C0)


def linear_colors(srgb: np.ndarray) -> torch.Tensor:
    """Linear RGB tensor from decoded sRGB: the inverse of `srgb_colors` for the readers."""
    return srgb_to_linear(torch.from_numpy(np.ascontiguousarray(srgb, dtype=np.float32)))


def unit_quaternions(quaternions_wxyz: np.ndarray) -> tuple[np.ndarray, ...]:
    """Columns (x, y, z, w) of the unit quaternions; a zero quaternion becomes the identity.

    The norm is summed in x, y, z, w order and divided by, as Niantic's `normalized()` does,
    so the float32 results match the reference encoder bit for bit.
    """
    w, x, y, z = (np.ascontiguousarray(c) for c in quaternions_wxyz.T)
    norm = np.sqrt(x * x + y * y + z * z + w * w)
    zero = norm == 0
    one = np.float32(1)
    w, norm = np.where(zero, one, w), np.where(zero, one, norm)
    return x / norm, y / norm, z / norm, w / norm


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: nearest integer, halves away from zero (np.rint rounds halves to even)."""
    truncated = np.trunc(x)
    tie = np.abs(x - truncated) == 0.5  # exact: x - trunc(x) has no rounding error
    return np.where(tie, truncated + np.sign(x), np.rint(x))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Niantic's toUint8: clamp(round(x), 0, 255)."""
    return np.clip(round_half_away(x), 0, 255).astype(np.uint8)
