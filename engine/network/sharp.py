"""The SHARP predictor: one image in, two layers of per-pixel 3D Gaussians out.

Submodule names follow the official checkpoint (`sharp_2572gikvuh.pt`) so its state dict
loads unchanged. The forward has no data-dependent Python control flow, so it can be
captured by `torch.export` for the compiled backends.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.network.composer import base_gaussians, compose
from engine.network.config import SharpConfig
from engine.network.gaussian_decoder import DeltaPredictionHead, GaussianDecoder
from engine.network.monodepth import MonodepthModel

# Disparity is clamped to this range before it is inverted to depth.
DISPARITY_RANGE = (1e-4, 1e4)

# Checkpoint tensors that inference never reads: the ViTs' ImageNet classifier heads and
# the depth-alignment network (used only with ground-truth depth during training).
UNUSED_CHECKPOINT_PREFIXES = (
    "monodepth_model.monodepth_predictor.encoder.patch_encoder.head.",
    "monodepth_model.monodepth_predictor.encoder.image_encoder.head.",
    "depth_alignment.scale_map_estimator.",
)


class SharpOutput(NamedTuple):
    """Gaussians in the network's NDC-like camera space (see `engine.network.composer`)."""

    means: torch.Tensor  # (B, N, 3)
    scales: torch.Tensor  # (B, N, 3)
    quaternions: torch.Tensor  # (B, N, 4), (w, x, y, z), unnormalized
    colors: torch.Tensor  # (B, N, 3), linear RGB
    opacities: torch.Tensor  # (B, N)
    disparity: torch.Tensor  # (B, L, H, W), the monodepth network's output


class SharpNetwork(nn.Module):
    def __init__(self, config: SharpConfig) -> None:
        super().__init__()
        self.config = config
        self.monodepth_model = MonodepthModel(config)
        self.feature_model = GaussianDecoder(config)
        self.prediction_head = DeltaPredictionHead(config.gaussian_feature_dim, config.num_layers)

    def forward(self, image: torch.Tensor, disparity_factor: torch.Tensor) -> SharpOutput:
        """Predict Gaussians.

        Args:
            image: (B, 3, R, R) RGB in [0, 1] at the internal resolution R.
            disparity_factor: (B,) focal length in pixels divided by the original image width;
                turns the network's disparity into metric depth.
        """
        disparity, encoder_features = self.monodepth_model(image)
        depth = disparity_factor[:, None, None, None] / disparity.clamp(*DISPARITY_RANGE)
        base, decoder_input = base_gaussians(image, depth)
        texture, geometry = self.feature_model(decoder_input, encoder_features)
        deltas = self.prediction_head(texture, geometry)
        return SharpOutput(*compose(base, deltas), disparity)


class TupleOutputs(nn.Module):
    """The network with its outputs as a plain tuple: the calling convention of every artifact."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, image: torch.Tensor, disparity_factor: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return tuple(self.network(image, disparity_factor))
