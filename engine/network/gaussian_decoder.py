"""From image, disparity and monodepth features to per-pixel Gaussian parameter deltas."""

from __future__ import annotations

import torch
from torch import nn

from engine.network.config import SharpConfig
from engine.network.layers import FeatureFusionBlock, MultiresConvDecoder, norm_relu_conv_residual


class SkipConv(nn.Module):
    """Strided conv that brings the full-resolution input to the decoder's resolution."""

    def __init__(self, dim_in: int, dim_out: int, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def feature_head(dim: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(
        norm_relu_conv_residual(dim, dim // 2),
        norm_relu_conv_residual(dim, dim // 2),
        nn.ReLU(),
        nn.Conv2d(dim, dim_out, 1),
        nn.ReLU(),
    )


class GaussianDecoder(nn.Module):
    """DPT decoder over the monodepth encoder features, fused with the image+disparity input.

    Returns texture and geometry feature maps at half the input resolution.
    """

    def __init__(self, config: SharpConfig) -> None:
        super().__init__()
        self.decoder = MultiresConvDecoder(config.encoder_dims, config.gaussian_decoder_dims)
        dim = self.decoder.dim_out
        self.image_encoder = SkipConv(config.gaussian_input_dim, dim)
        self.fusion = FeatureFusionBlock(dim)
        self.texture_head = feature_head(dim, config.gaussian_feature_dim)
        self.geometry_head = feature_head(dim, config.gaussian_feature_dim)

    def forward(
        self, inputs: torch.Tensor, encodings: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fusion(self.decoder(encodings), self.image_encoder(inputs))
        return self.texture_head(features), self.geometry_head(features)


class DeltaPredictionHead(nn.Module):
    """1x1 convs to 14 deltas per layer: mean (3), scale (3), quaternion (4), color (3), opacity (1)."""

    NUM_GEOMETRY, NUM_TEXTURE = 3, 11

    def __init__(self, feature_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.geometry_prediction_head = nn.Conv2d(feature_dim, self.NUM_GEOMETRY * num_layers, 1)
        self.texture_prediction_head = nn.Conv2d(feature_dim, self.NUM_TEXTURE * num_layers, 1)

    def forward(self, texture: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """Returns deltas shaped (B, 14, num_layers, H, W)."""
        geometry = self.geometry_prediction_head(geometry).unflatten(1, (self.NUM_GEOMETRY, -1))
        texture = self.texture_prediction_head(texture).unflatten(1, (self.NUM_TEXTURE, -1))
        return torch.cat([geometry, texture], dim=1)
