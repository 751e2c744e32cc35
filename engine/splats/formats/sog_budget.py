"""A .sog that fits a byte budget: the finest precision level that fits, then, when the client
allows it, only as many Gaussians as fit.

Precision levels (engine.splats.formats.sog_precision) go from 0, the default, measured to
render visually lossless, to MAX_LEVEL, the coarsest this writer accepts; each doubles every
tolerance. The writer tries them in order and keeps the first file within the budget. When
even MAX_LEVEL does not fit, and pruning is allowed, it keeps the Gaussians of largest
importance (engine.splats.pruning, the same ranking as max_gaussians), as few fewer as the
bytes per Gaussian of the last try say will fit, and tries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.splats.formats import sog_precision
from engine.splats.formats.sog import MAX_LEVEL, write_sog
from engine.splats.gaussians import Gaussians
from engine.splats.pruning import prune

_PRUNE_MARGIN = 0.97  # aim this far under the budget: a pruned file's bytes per Gaussian vary
_PRUNE_TRIES = 6


class SogBudgetError(ValueError):
    """The Gaussians do not fit the budget at the coarsest precision, and pruning is off."""


@dataclass(frozen=True)
class SogFit:
    data: bytes
    level: int
    num_gaussians: int
    pruned_to_fit: bool
    max_bytes: int | None
    focal_length_px: float | None

    def summary(self) -> dict[str, Any]:
        """What the writer did, for the job's result."""
        return {
            "precision_level": self.level,
            "precision": sog_precision.describe(self.level, self.focal_length_px),
            "budget_bytes": self.max_bytes,
            "pruned_to_fit": self.pruned_to_fit,
        }


def write_sog_within(
    gaussians: Gaussians,
    *,
    max_bytes: int | None,
    focal_length_px: float,
    allow_pruning: bool,
    grid: tuple[int, int, int] | None = None,
) -> SogFit:
    """The .sog at the finest precision level within max_bytes (None: level 0, no budget)."""

    def fit(data: bytes, level: int, g: Gaussians) -> SogFit:
        pruned = len(g) < len(gaussians)
        return SogFit(data, level, len(g), pruned, max_bytes, focal_length_px)

    levels = range(MAX_LEVEL + 1) if max_bytes is not None else range(1)
    for level in levels:
        data = write_sog(gaussians, grid=grid, level=level, focal_length_px=focal_length_px)
        if max_bytes is None or len(data) <= max_bytes:
            return fit(data, level, gaussians)
    assert max_bytes is not None
    if not allow_pruning:
        raise SogBudgetError(
            f"the .sog of all {len(gaussians):,} Gaussians is {len(data):,} bytes at the coarsest "
            f"precision, over the budget of {max_bytes:,}; allow prune_to_fit, or ask for fewer "
            "Gaussians (max_gaussians) or a URL (return: url, with a bucket)"
        )
    kept = gaussians
    for _ in range(_PRUNE_TRIES if max_bytes > 0 else 0):
        target = max(1, int(len(kept) * max_bytes / len(data) * _PRUNE_MARGIN))
        kept = prune(gaussians, max_gaussians=target, focal_length_px=focal_length_px)
        data = write_sog(kept, level=MAX_LEVEL, focal_length_px=focal_length_px)
        if len(data) <= max_bytes:
            return fit(data, MAX_LEVEL, kept)
    raise SogBudgetError(
        f"no .sog within {max_bytes:,} bytes could be made; ask for a URL (return: url, with "
        "a bucket) or raise the inline limit (SHARP_MAX_INLINE_BYTES)"
    )
