"""Where a .sog spends its precision: per-Gaussian tolerances, and quantizers that use them.

SOG v2 fixes the containers (16-bit log positions, 8-bit rotation components, 256-entry
codebooks), not how finely a writer fills them. A position error far below a pixel of the
input view at the Gaussian's depth, or far below the Gaussian's own size, cannot be seen; bits
spent below that are noise that WebP cannot compress. So each Gaussian gets a spatial
tolerance, in metres:

  tol = POSITION_FRACTION x 2^level x max(|z| / f, smallest scale)

(|z| / f: one input pixel at its depth, f the focal length in pixels; without a camera, the
size term alone). Every attribute is then stored on the coarsest grid that keeps what a viewer
sees within it, rounding the stored integers to a multiple of a power of two m (low bits zero,
which WebP's entropy coder turns into fewer bits):

  positions  the 16-bit value n to a multiple of m, m / 2 steps within tol / (1 + |p|) in log
             space: |p' - p| <= tol (1 + step), whatever the axis;
  rotations  each stored byte's distance from the centre 127.5 floored to a multiple of m,
             never larger (so the rebuilt largest component stays real): with the rebuilt
             largest's change, an angle under 4 sqrt3 m sqrt2/255 radians, which moves the
             surface at 2 sigma of a Gaussian
             with scales s_min..s_max by at most 2 angle (s_max - s_min) <= tol; isotropic
             Gaussians need no rotation at all;
  scales     the codebook index to a multiple of m where the entry there is within
             tol / (2 s) of ln s (the surface at 2 sigma moves by at most tol);
  colours    the codebook index likewise, within COLOR_TOLERANCE x 2^level / max(opacity,
             1/16) in sRGB (faint Gaussians' colours weigh less in the picture).

Opacity stays 8-bit exact. Level 0 is the default: rendered by Spark from the capture camera
and two novel viewpoints it stays above VISUALLY_LOSSLESS_PSNR_DB against the exact .ply
(benchmarks/sog_quality.py; README, output formats). Each level up doubles every tolerance,
for a byte budget, up to sog.MAX_LEVEL.
"""

from __future__ import annotations

import math

import torch

from engine.splats.formats.common import SH_C0
from engine.splats.gaussians import Gaussians

POSITION_FRACTION = 0.25  # of a pixel at the Gaussian's depth, or of its smallest scale
COLOR_TOLERANCE = 2 / 255  # sRGB, for an opaque Gaussian at level 0
VISUALLY_LOSSLESS_PSNR_DB = 42.0  # and SSIM >= 0.99: no difference to see side by side
MAX_POSITION_STEP = 1 << 15
MAX_ROTATION_STEP = 64
MAX_INDEX_STEP = 64
_BYTE_COMPONENT = math.sqrt(2) / 255  # a stored rotation byte's step as a quaternion component


def spatial_tolerance(g: Gaussians, *, focal_length_px: float | None, level: int) -> torch.Tensor:
    """(N,) float32 metres: how far a Gaussian's surface may move unseen at this level."""
    smallest = g.scales.float().amin(dim=1)
    size = smallest
    if focal_length_px is not None:
        size = torch.maximum(size, g.means[:, 2].float().abs() / focal_length_px)
    return size.mul_(POSITION_FRACTION * 2.0**level).nan_to_num_(0.0, 0.0, 0.0)


def snap_positions(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """int32 16-bit values for x (float, in steps), each to a multiple of a power of two m
    with m / 2 <= allowed (steps), or to the nearest step when allowed < 1."""
    m = _power_of_two(allowed * 2, MAX_POSITION_STEP)
    return (x / m).round_().mul_(m).clamp_(0, 65535).to(torch.int32)


def snap_rotation_bytes(
    stored: list[torch.Tensor], scales: torch.Tensor, tolerance: torch.Tensor
) -> list[torch.Tensor]:
    """The three stored rotation bytes moved towards the centre, each by less than m.

    Bit arithmetic on the bytes: the distance from the centre 127.5 is a = b - 128 for
    b >= 128 and 127 - b below (b XOR 0x7F), so flooring a to a multiple of m = 2^e keeps the
    top bit and clears the low e bits of a.
    """
    spread = (scales.amax(dim=1) - scales.amin(dim=1)).float()
    # angle <= 4 sqrt3 m _BYTE_COMPONENT and 2 angle spread <= tolerance
    allowed = tolerance / (8 * math.sqrt(3) * _BYTE_COMPONENT) / spread.clamp_min(1e-30)
    e = _exponent(allowed, MAX_ROTATION_STEP)
    keep = torch.full_like(e, 0x7F).bitwise_right_shift_(e).bitwise_left_shift_(e)
    snapped = []
    for b in stored:
        top = b & 0x80
        flip = (top >> 7).sub_(1).bitwise_and_(0x7F)  # 0x7F below the centre, else 0
        snapped.append((b ^ flip).bitwise_and_(keep).bitwise_xor_(flip).bitwise_or_(top))
    return snapped


def snap_labels(
    codebook: torch.Tensor,
    labels: list[torch.Tensor],
    values: list[torch.Tensor],
    allowed: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Each column's labels moved to a multiple of a power of two m (at most MAX_INDEX_STEP)
    where codebook[label] stays within `allowed` of the value; otherwise kept.

    m comes from the gap between the label's entry and the next (a guess where gaps vary),
    so the result is checked against the value once, and a failing label stays as it was.
    """
    gaps = codebook.diff().clamp_min(1e-30)
    gaps = torch.cat([gaps, gaps[-1:]])
    out = []
    for label, value, limit in zip(labels, values, allowed):
        index = label.to(torch.int32)
        e = _exponent(limit / gaps.index_select(0, index), MAX_INDEX_STEP).to(torch.int32)
        half = (e > 0).to(torch.int32).bitwise_left_shift_(e).bitwise_right_shift_(1)
        snapped = (index + half).bitwise_right_shift_(e).bitwise_left_shift_(e).clamp_(max=255)
        ok = (codebook.index_select(0, snapped) - value).abs_() <= limit
        out.append(torch.where(ok, snapped, index).to(torch.uint8))
    return out


def scale_allowance(log_scales: list[torch.Tensor], tolerance: torch.Tensor) -> list[torch.Tensor]:
    """Allowed |ln s' - ln s| per axis: the surface at 2 sigma moves by 2 s |d ln s|."""
    return [tolerance / (2 * t.exp()).clamp_min(1e-30) for t in log_scales]


def color_allowance(opacities: torch.Tensor, level: int) -> torch.Tensor:
    """Allowed |sh0' - sh0| per Gaussian (sRGB tolerance over SH_C0)."""
    weight = opacities.float().clamp_min(1 / 16)
    return (COLOR_TOLERANCE * 2.0**level / SH_C0) / weight


def describe(level: int, focal_length_px: float | None) -> str:
    """What the file's quantization keeps, for meta.json and the result."""
    fraction = POSITION_FRACTION * 2.0**level
    size = (
        "max(a pixel at its depth, its smallest scale)" if focal_length_px else "its smallest scale"
    )
    return (
        f"precision level {level}: each Gaussian's tol = {fraction:g} x {size}; positions "
        "within tol, rotations and log scales moving its 2-sigma surface by at most tol, sRGB "
        f"colours within {COLOR_TOLERANCE * 2.0**level * 255:g}/255 / max(opacity, 1/16)"
    )


def _power_of_two(allowed: torch.Tensor, cap: int) -> torch.Tensor:
    """The largest power of two m <= allowed (1 when allowed < 1), at most cap, as float32."""
    exponent = allowed.float().clamp(1, cap).log2_().floor_()
    return exponent.exp2_()


def _exponent(allowed: torch.Tensor, cap: int) -> torch.Tensor:
    """log2 of `_power_of_two`, as uint8."""
    return allowed.float().clamp(1, cap).log2_().floor_().to(torch.uint8)
