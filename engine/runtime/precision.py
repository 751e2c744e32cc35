"""Precision plans: which of the network's blocks run in half precision, with explicit casts.

A plan is float32 throughout, or the top-level blocks in `BLOCKS` in float16/bfloat16 with
explicit casts at their borders and everything else (depth normalization, the composer) in
float32. Explicit casts, not autocast, give one set of numerics for every backend: TensorRT
builds the graph strongly typed (it honours the dtypes it is given), and no weight is re-cast
on every call. The default set of float32 blocks is a constant; `validation.measure_blocks` (a
build-tool option, never cold-start work) shows what each block costs in accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from engine.network.blocks import BLOCKS, PREDICTOR, resolve_block

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Kept in float32 unless configured otherwise: the disparity head sets every depth, the delta
# head feeds exp/sigmoid activations; both are a small share of the FLOPs.
DEFAULT_FP32_BLOCKS = (f"{PREDICTOR}.head", "prediction_head")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    fp32_blocks: tuple[str, ...] = ()  # of BLOCKS, kept in float32 (all of them for fp32)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def half_blocks(self) -> tuple[str, ...]:
        if self.precision == "fp32":
            return ()
        return tuple(block for block in BLOCKS if block not in self.fp32_blocks)

    def describe(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        kept = ", ".join(block.rsplit(".", 1)[-1] for block in self.fp32_blocks) or "none"
        return f"{self.precision} (fp32 blocks: {kept})"

    @classmethod
    def for_precision(
        cls, precision: str, fp32_blocks: Sequence[str] | None = None
    ) -> PrecisionPlan:
        """The plan for `precision`: `fp32_blocks` (default DEFAULT_FP32_BLOCKS) kept in fp32."""
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}; got {precision!r}")
        if precision == "fp32":
            return cls("fp32")
        blocks = DEFAULT_FP32_BLOCKS if fp32_blocks is None else fp32_blocks
        return cls(precision, tuple(b for b in BLOCKS if b in {resolve_block(x) for x in blocks}))

    def identity(self) -> str:
        return self.precision + (
            "" if self.precision == "fp32" else ":" + ",".join(sorted(self.fp32_blocks))
        )


class CastBlock(nn.Module):
    """Runs a block in half precision: floating inputs cast in, outputs cast back to float32."""

    def __init__(self, block: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.block = block
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        args = pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.dtype), args)
        return pytree.tree_map_only(torch.Tensor, lambda t: t.float(), self.block(*args))


def mixed_network(network: nn.Module, plan: PrecisionPlan) -> nn.Module:
    """The network under `plan`, sharing its float32 weights outside the half-precision blocks.

    The original network is left unchanged: the modules on the path to each replaced block
    are shallow copies.
    """
    mixed = network
    for name in plan.half_blocks:
        with torch.no_grad():
            half = copy.deepcopy(network.get_submodule(name)).to(plan.dtype)
        mixed = _with_submodule(mixed, name, CastBlock(half, plan.dtype))
    return mixed


def _with_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    head, _, rest = path.partition(".")
    clone = copy.copy(root)
    clone.__dict__["_modules"] = dict(root._modules)
    clone._modules[head] = _with_submodule(root._modules[head], rest, new) if rest else new
    return clone
