"""Deterministic weights for any SHARP state dict: the weights of the golden test fixtures.

Each tensor is a pure function of its key and shape, so every implementation with the official
checkpoint's keys gets the same numbers bit for bit, and outputs can be compared without the
real checkpoint. The golden fixtures (tests/data/golden) were made with these weights.

Per key: draws n from NumPy's legacy `RandomState` seeded with the key's CRC-32 (a stream NumPy
keeps frozen), then scales them by the tensor's role:

  * pos_embed, cls_token: 0.02 n
  * LayerScale gamma: 0.1 + 0.02 n
  * kernels (2 or more dimensions): n / sqrt(fan-in), fan-in the product of all but dim 0
  * other 1-dimensional weights (norms): 1 + 0.1 n
  * the rest (biases): 0.02 + 0.05 n

The last disparity convolution draws |n|, so that every predicted disparity is positive.
Values are float32.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch

_POSITIVE = ("monodepth_predictor.head.4.weight", "monodepth_predictor.head.4.bias")


def fixture_tensor(key: str, shape: Iterable[int]) -> torch.Tensor:
    dims = tuple(int(d) for d in shape)
    draws = np.random.RandomState(zlib.crc32(key.encode())).standard_normal(dims)
    draws = np.abs(draws) if key.endswith(_POSITIVE) else draws
    name = key.rpartition(".")[2]
    if name in ("pos_embed", "cls_token"):
        values = 0.02 * draws
    elif name == "gamma":
        values = 0.1 + 0.02 * draws
    elif len(dims) >= 2:
        values = draws / math.sqrt(math.prod(dims[1:]))
    elif name == "weight":
        values = 1.0 + 0.1 * draws
    else:
        values = 0.02 + 0.05 * draws
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def fixture_weights(shapes: Mapping[str, Iterable[int] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """key -> deterministic tensor, for a mapping of key -> shape or a model's state_dict()."""
    return {
        key: fixture_tensor(key, value.shape if isinstance(value, torch.Tensor) else value)
        for key, value in shapes.items()
    }
