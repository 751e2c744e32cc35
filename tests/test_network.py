"""The network's state dict matches the official checkpoint's keys and shapes exactly."""

from __future__ import annotations

import pytest
import torch

from engine.network import UNUSED_CHECKPOINT_PREFIXES, SharpNetwork
from engine.network.color import linear_to_srgb, srgb_to_linear
from engine.network.composer import inverse_softplus
from engine.network.config import SharpConfig
from engine.network.monodepth import merge_tiles, split_into_tiles


def used_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in shapes.items() if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)}


@pytest.mark.parametrize(
    ("shapes_fixture", "expected"),
    [("official_shapes", SharpConfig()), ("tiny_shapes", SharpConfig.tiny())],
)
def test_config_is_read_off_checkpoint_shapes(request, shapes_fixture, expected):
    shapes = request.getfixturevalue(shapes_fixture)
    assert SharpConfig.from_state_dict(shapes) == expected


@pytest.mark.parametrize("shapes_fixture", ["official_shapes", "tiny_shapes"])
def test_state_dict_has_exactly_the_checkpoint_keys(request, shapes_fixture):
    shapes = request.getfixturevalue(shapes_fixture)
    with torch.device("meta"):
        model = SharpNetwork(SharpConfig.from_state_dict(shapes))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == used_shapes(shapes)


def test_skipped_keys_are_only_heads_and_depth_alignment(official_shapes):
    skipped = [k for k in official_shapes if k.startswith(UNUSED_CHECKPOINT_PREFIXES)]
    skipped_values = sum(torch.Size(official_shapes[k]).numel() for k in skipped)
    heads = [k for k in skipped if ".head." in k]
    assert len(heads) == 4  # weight and bias of both ViT classifier heads
    assert sum(torch.Size(official_shapes[k]).numel() for k in heads) == 2 * (21841 * 1024 + 21841)
    assert skipped_values < 50_000_000  # nothing else large is left unread


def test_official_sizes():
    config = SharpConfig()
    assert config.internal_resolution == 1536
    assert config.num_gaussians == 1_179_648


def test_tiles_split_and_merge_back():
    # Features that are a pure function of position survive split -> per-tile -> merge.
    size, tile = 96, 24
    ramp = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    tiles = split_into_tiles(ramp, tile, overlap=0.25)
    assert tiles.shape == (25, 1, tile, tile)
    merged = merge_tiles(tiles, batch_size=1, crop=3)
    assert merged.shape == (1, 1, 96, 96)
    assert torch.equal(merged, ramp)


def test_activations():
    x = torch.linspace(0.01, 20, 1000, dtype=torch.float64)
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(x)), x, rtol=1e-9)
    c = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(linear_to_srgb(srgb_to_linear(c)), c, atol=1e-9)
    assert srgb_to_linear(torch.tensor(0.5)).item() == pytest.approx(0.21404, abs=1e-5)
