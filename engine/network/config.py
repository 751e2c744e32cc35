"""Configuration of the SHARP network, read off a checkpoint's tensor shapes.

Every size of the architecture is visible in some weight's shape, so one loading path
serves the official checkpoint and any smaller configuration (the tiny test model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Attention heads are 64 wide in every published configuration.
HEAD_DIM = 64

_ENCODER = "monodepth_model.monodepth_predictor.encoder"
_MONODEPTH_DECODER = "monodepth_model.monodepth_predictor.decoder"
_GAUSSIAN_DECODER = "feature_model.decoder"


@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT (timm `VisionTransformer` layout) with a class token and LayerScale."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    img_size: int = 384
    patch_size: int = 16
    mlp_hidden_dim: int = 4096
    in_chans: int = 3

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class SharpConfig:
    """Sizes of the SHARP predictor. Defaults are the official checkpoint's."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    # Patch-encoder blocks whose outputs feed the two highest-resolution features.
    patch_encoder_hook_block_ids: tuple[int, ...] = (5, 11, 17, 23)
    # Widths of encoder features 1..4 (feature 0 takes the monodepth decoder width).
    monodepth_encoder_dims: tuple[int, ...] = (256, 512, 1024, 1024)
    monodepth_decoder_dims: tuple[int, ...] = (256, 256, 256, 256, 256)
    gaussian_decoder_dims: tuple[int, ...] = (128, 128, 128, 128, 128)
    gaussian_feature_dim: int = 32
    # Channels of the image + normalized disparity input to the Gaussian decoder.
    gaussian_input_dim: int = 5
    num_layers: int = 2

    @property
    def internal_resolution(self) -> int:
        """Side of the square network input: the sliding pyramid spans 4 ViT tiles."""
        return 4 * self.vit.img_size

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        """Widths of the five multi-resolution encoder features."""
        return (self.monodepth_decoder_dims[0], *self.monodepth_encoder_dims)

    @property
    def num_gaussians(self) -> int:
        return self.num_layers * (self.internal_resolution // 2) ** 2

    @classmethod
    def tiny(cls) -> SharpConfig:
        """A small configuration with the official geometry, for tests and offline demos."""
        return cls(
            vit=ViTConfig(embed_dim=128, depth=4, num_heads=2, mlp_hidden_dim=512),
            patch_encoder_hook_block_ids=(0, 1, 2, 3),
            monodepth_encoder_dims=(16, 32, 64, 64),
            monodepth_decoder_dims=(32, 32, 32, 32, 32),
            gaussian_decoder_dims=(16, 16, 16, 16, 16),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor | Sequence[int]]) -> SharpConfig:
        """Read every size off the tensor shapes of a checkpoint."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise KeyError(f"checkpoint has no tensor '{key}': not a SHARP checkpoint")
            value = state_dict[key]
            return tuple(value.shape if hasattr(value, "shape") else value)

        vit_prefix = f"{_ENCODER}.patch_encoder"
        embed_dim, in_chans, patch_size, _ = shape(f"{vit_prefix}.patch_embed.proj.weight")
        num_tokens = shape(f"{vit_prefix}.pos_embed")[1] - 1  # minus the class token
        depth = _count_indices(state_dict, f"{vit_prefix}.blocks.")
        vit = ViTConfig(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // HEAD_DIM,
            img_size=math.isqrt(num_tokens) * patch_size,
            patch_size=patch_size,
            mlp_hidden_dim=shape(f"{vit_prefix}.blocks.0.mlp.fc1.weight")[0],
            in_chans=in_chans,
        )
        # ConvTranspose2d weights are (in, out, k, k); Conv2d weights are (out, in, k, k).
        monodepth_encoder_dims = (
            shape(f"{_ENCODER}.upsample_latent1.0.weight")[0],
            shape(f"{_ENCODER}.upsample0.0.weight")[0],
            shape(f"{_ENCODER}.upsample1.0.weight")[0],
            shape(f"{_ENCODER}.upsample2.0.weight")[0],
        )
        num_levels = len(monodepth_encoder_dims) + 1
        monodepth_decoder_dims = tuple(
            shape(f"{_MONODEPTH_DECODER}.fusions.{i}.resnet2.residual.1.weight")[0]
            for i in range(num_levels)
        )
        gaussian_decoder_dims = tuple(
            shape(f"{_GAUSSIAN_DECODER}.fusions.{i}.resnet2.residual.1.weight")[0]
            for i in range(num_levels)
        )
        geometry_out = shape("prediction_head.geometry_prediction_head.weight")[0]
        return cls(
            vit=vit,
            # Hooks sit at the end of each quarter of the patch encoder (5, 11, 17, 23 of 24).
            patch_encoder_hook_block_ids=tuple(depth // 4 * (i + 1) - 1 for i in range(4)),
            monodepth_encoder_dims=monodepth_encoder_dims,
            monodepth_decoder_dims=monodepth_decoder_dims,
            gaussian_decoder_dims=gaussian_decoder_dims,
            gaussian_feature_dim=shape("feature_model.texture_head.3.weight")[0],
            gaussian_input_dim=shape("feature_model.image_encoder.conv.weight")[1],
            num_layers=geometry_out // 3,
        )


def _count_indices(state_dict: Mapping[str, object], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    if not indices:
        raise KeyError(f"checkpoint has no tensors under '{prefix}': not a SHARP checkpoint")
    return max(indices) + 1
