"""Two-layer monocular disparity network (Depth Pro style sliding-pyramid ViT encoder + DPT).

The encoder views the 1536-pixel image as a 3-level pyramid: 5x5 overlapping 384-pixel
tiles at full resolution, 3x3 at half, and the whole image at quarter resolution. One ViT
encodes all 35 tiles as a batch; a second ViT encodes the whole image for global context.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.network.config import SharpConfig
from engine.network.layers import MultiresConvDecoder, conv_transpose_2x
from engine.network.vit import VisionTransformer


def split_into_tiles(image: torch.Tensor, tile_size: int, overlap: float) -> torch.Tensor:
    """Square tiles in row-major order, stacked on the batch axis: tile t of image b at t*B + b."""
    stride = int(tile_size * (1 - overlap))
    steps = math.ceil((image.shape[-1] - tile_size) / stride) + 1
    tiles = [
        image[..., row * stride : row * stride + tile_size, col * stride : col * stride + tile_size]
        for row in range(steps)
        for col in range(steps)
    ]
    return torch.cat(tiles, dim=0)


def merge_tiles(tiles: torch.Tensor, batch_size: int, crop: int) -> torch.Tensor:
    """Inverse of `split_into_tiles` on feature maps: crop shared borders, then stitch."""
    steps = math.isqrt(tiles.shape[0] // batch_size)
    rows = []
    for row in range(steps):
        row_tiles = []
        for col in range(steps):
            tile = tiles[(row * steps + col) * batch_size : (row * steps + col + 1) * batch_size]
            height, width = tile.shape[-2:]
            top = crop if row > 0 else 0
            bottom = height - crop if row < steps - 1 else height
            left = crop if col > 0 else 0
            right = width - crop if col < steps - 1 else width
            row_tiles.append(tile[..., top:bottom, left:right])
        rows.append(torch.cat(row_tiles, dim=-1))
    return torch.cat(rows, dim=-2)


def project_and_upsample(dim_in: int, dim_out: int, num_upsamples: int, dim_mid: int | None = None):
    """1x1 projection followed by learned 2x upsamplings."""
    dim_mid = dim_out if dim_mid is None else dim_mid
    layers: list[nn.Module] = [nn.Conv2d(dim_in, dim_mid, 1, bias=False)]
    layers += [
        conv_transpose_2x(dim_mid if i == 0 else dim_out, dim_out) for i in range(num_upsamples)
    ]
    return nn.Sequential(*layers)


class SlidingPyramidEncoder(nn.Module):
    """Five feature maps at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input resolution."""

    # Crop (in ViT tokens) where neighbouring tiles overlap: 25% and 50% overlap of 24 tokens.
    FULL_RES_OVERLAP, HALF_RES_OVERLAP = 0.25, 0.5
    FULL_RES_CROP = 3

    def __init__(self, config: SharpConfig) -> None:
        super().__init__()
        dims = config.encoder_dims
        embed_dim = config.vit.embed_dim
        self.tile_size = config.vit.img_size
        self.patch_encoder = VisionTransformer(config.vit, config.patch_encoder_hook_block_ids[:2])
        self.image_encoder = VisionTransformer(config.vit)
        self.upsample_latent0 = project_and_upsample(embed_dim, dims[0], 3, dim_mid=dims[1])
        self.upsample_latent1 = project_and_upsample(embed_dim, dims[1], 2)
        self.upsample0 = project_and_upsample(embed_dim, dims[2], 1)
        self.upsample1 = project_and_upsample(embed_dim, dims[3], 1)
        self.upsample2 = project_and_upsample(embed_dim, dims[4], 1)
        self.upsample_lowres = conv_transpose_2x(embed_dim, dims[4], bias=True)
        self.fuse_lowres = nn.Conv2d(2 * dims[4], dims[4], 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch = x.shape[0]
        half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        quarter = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
        full_tiles = split_into_tiles(x, self.tile_size, self.FULL_RES_OVERLAP)
        half_tiles = split_into_tiles(half, self.tile_size, self.HALF_RES_OVERLAP)
        num_full, num_half = full_tiles.shape[0], half_tiles.shape[0]

        features, taps = self.patch_encoder(torch.cat([full_tiles, half_tiles, quarter], dim=0))
        full, half_res, whole = torch.split(features, [num_full, num_half, batch], dim=0)
        crop = self.FULL_RES_CROP
        latent0 = merge_tiles(taps[0][:num_full], batch, crop)
        latent1 = merge_tiles(taps[1][:num_full], batch, crop)
        full = merge_tiles(full, batch, crop)
        half_res = merge_tiles(half_res, batch, 2 * crop)

        global_context, _ = self.image_encoder(quarter)
        whole = self.upsample2(whole)
        lowres = self.fuse_lowres(torch.cat([whole, self.upsample_lowres(global_context)], dim=1))
        return [
            self.upsample_latent0(latent0),
            self.upsample_latent1(latent1),
            self.upsample0(full),
            self.upsample1(half_res),
            lowres,
        ]


class DisparityHead(nn.Sequential):
    """Decoder features (1/2 resolution) to per-layer disparity at full resolution."""

    def __init__(self, dim: int, num_layers: int, dim_last: int = 32) -> None:
        super().__init__(
            nn.Conv2d(dim, dim // 2, 3, padding=1),
            conv_transpose_2x(dim // 2, dim // 2, bias=True),
            nn.Conv2d(dim // 2, dim_last, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim_last, num_layers, 1),
            nn.ReLU(),
        )


class MonodepthOutput(NamedTuple):
    disparity: torch.Tensor  # (B, num_layers, H, W), unitless, > 0 where valid
    encoder_features: list[torch.Tensor]


class MonodepthPredictor(nn.Module):
    def __init__(self, config: SharpConfig) -> None:
        super().__init__()
        self.encoder = SlidingPyramidEncoder(config)
        self.decoder = MultiresConvDecoder(config.encoder_dims, config.monodepth_decoder_dims)
        self.head = DisparityHead(self.decoder.dim_out, config.num_layers)

    def forward(self, image: torch.Tensor) -> MonodepthOutput:
        features = self.encoder(image * 2.0 - 1.0)  # [0, 1] -> [-1, 1]
        return MonodepthOutput(self.head(self.decoder(features)), features)


class MonodepthModel(nn.Module):
    """Holds the predictor under the checkpoint's `monodepth_model.monodepth_predictor` prefix."""

    def __init__(self, config: SharpConfig) -> None:
        super().__init__()
        self.monodepth_predictor = MonodepthPredictor(config)

    def forward(self, image: torch.Tensor) -> MonodepthOutput:
        return self.monodepth_predictor(image)
