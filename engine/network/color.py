"""The sRGB transfer function, one definition for the network and every file format.

SHARP works in linear RGB; viewers blend stored colours as they are, so files store sRGB. It
lives in the network package because the network's composer calls it (it is traced into
compiled artifacts); the file formats import it from here.
"""

from __future__ import annotations

import torch


def srgb_to_linear(srgb: torch.Tensor) -> torch.Tensor:
    # Clamp the power branch's input so the unused branch never sees a negative base.
    power = ((srgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(srgb <= 0.04045, srgb / 12.92, power)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    power = 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055
    return torch.where(linear <= 0.0031308, linear * 12.92, power)
