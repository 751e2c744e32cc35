"""Convolutional building blocks shared by SHARP's depth and Gaussian decoders (DPT style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """x + residual(x), with an optional projection on the skip path."""

    def __init__(self, residual: nn.Sequential, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.residual(x)


def relu_conv_residual(dim: int) -> ResidualBlock:
    """(ReLU, 3x3 conv) twice: the residual unit of DPT's fusion blocks."""
    return ResidualBlock(
        nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )
    )


def norm_relu_conv_residual(dim: int, hidden_dim: int, num_groups: int = 8) -> ResidualBlock:
    """(GroupNorm, ReLU, 3x3 conv) twice, through a narrower hidden width."""
    return ResidualBlock(
        nn.Sequential(
            nn.GroupNorm(num_groups, dim),
            nn.ReLU(),
            nn.Conv2d(dim, hidden_dim, 3, padding=1),
            nn.GroupNorm(num_groups, hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, dim, 3, padding=1),
        )
    )


def conv_transpose_2x(dim_in: int, dim_out: int, bias: bool = False) -> nn.ConvTranspose2d:
    """Learned 2x upsampling."""
    return nn.ConvTranspose2d(dim_in, dim_out, kernel_size=2, stride=2, bias=bias)


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip feature to the running feature, refines, optionally upsamples 2x."""

    def __init__(self, dim: int, dim_out: int | None = None, upsample: bool = False) -> None:
        super().__init__()
        self.resnet1 = relu_conv_residual(dim)
        self.resnet2 = relu_conv_residual(dim)
        # An empty Sequential is the identity; the name matches the checkpoint's keys.
        self.deconv = conv_transpose_2x(dim, dim) if upsample else nn.Sequential()
        self.out_conv = nn.Conv2d(dim, dim if dim_out is None else dim_out, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resnet1(skip)
        return self.out_conv(self.deconv(self.resnet2(x)))


class MultiresConvDecoder(nn.Module):
    """Fuses multi-resolution features from the coarsest (last) to the finest (first) level."""

    def __init__(self, dims_encoder: Sequence[int], dims_decoder: Sequence[int]) -> None:
        super().__init__()
        if len(dims_encoder) != len(dims_decoder):
            raise ValueError("dims_encoder and dims_decoder must have the same length")
        self.dim_out = dims_decoder[0]
        # Level 0 is projected only where the widths differ, as in the checkpoint.
        first = (
            nn.Identity()
            if dims_encoder[0] == dims_decoder[0]
            else nn.Conv2d(dims_encoder[0], dims_decoder[0], 1, bias=False)
        )
        self.convs = nn.ModuleList(
            [first]
            + [
                nn.Conv2d(dim_in, dim_out, 3, padding=1, bias=False)
                for dim_in, dim_out in zip(dims_encoder[1:], dims_decoder[1:])
            ]
        )
        self.fusions = nn.ModuleList(
            FeatureFusionBlock(dims_decoder[i], dims_decoder[max(i - 1, 0)], upsample=i > 0)
            for i in range(len(dims_decoder))
        )

    def forward(self, encodings: Sequence[torch.Tensor]) -> torch.Tensor:
        features = self.fusions[-1](self.convs[-1](encodings[-1]))
        for level in range(len(encodings) - 2, -1, -1):
            features = self.fusions[level](features, self.convs[level](encodings[level]))
        return features
