"""256-entry codebooks for 1-D values, by a few Lloyd (1-D k-means) iterations on the device.

Used by the SOG writer for scales and colours. The values' histogram over CODEBOOK_BINS equal
bins stands in for them, each bin for its values' mean with weight count^CODEBOOK_ALPHA (see
engine.splats.formats.sog for why 0.2). The end entries are the data's extremes and each value
takes its nearest entry, so no value errs by more than half the largest gap between entries.
Everything is small steps on the values' device with no host synchronization.
"""

from __future__ import annotations

import torch

CODEBOOK_SIZE = 256
CODEBOOK_BINS = 1 << 12
CODEBOOK_ALPHA = 0.2  # histogram weight exponent: 1 = plain k-means, 0 = even over occupied bins
CODEBOOK_ITERATIONS = 8


def codebook_labels(columns: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One sorted 256-entry codebook for the pooled columns and each column's uint8 labels."""
    values = torch.cat(columns)
    low, high = torch.aminmax(values)
    bins = CODEBOOK_BINS
    span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    index = (values - low).mul_(bins / span).to(torch.int32).clamp_(0, bins - 1)
    # index_add_ rather than bincount, which synchronizes with the host on CUDA to size its result.
    ones = values.new_ones(()).expand_as(values)
    counts = torch.zeros(bins, device=values.device).index_add_(0, index, ones)
    sums = torch.zeros(bins, device=values.device).index_add_(0, index, values)
    codebook = _lloyd(counts, sums, low, span)
    # The nearest entry by table: below[b] entries' midpoints lie at or below bin b's left edge,
    # so a value in bin b is nearest to entry below[b], or the next one past its midpoint. A bin
    # holding two midpoints can give the second-nearest entry, within one bin width (span/4096),
    # which never exceeds half the largest gap (at least span/510).
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    edges = low + torch.arange(bins, device=values.device) * (span / bins)
    below = torch.bucketize(edges, midpoints, right=True).to(torch.int32)
    next_midpoint = torch.cat([midpoints, high[None] + span])[below]
    labels = below.to(torch.uint8).index_select(0, index)
    labels += values > next_midpoint.index_select(0, index)
    return codebook, list(labels.split(len(columns[0])))


def _lloyd(
    counts: torch.Tensor, sums: torch.Tensor, low: torch.Tensor, span: torch.Tensor
) -> torch.Tensor:
    """(256,) float32 entries, ascending, the first and last at the values' extremes, from the
    values' histogram over CODEBOOK_BINS equal bins from low to low + span: each bin's count
    and the sum of its values (so a bin stands for its values' mean, and a few distinct values
    get exact entries).

    A fixed count of Lloyd iterations, small steps on the device without host synchronization.
    """
    bins, k, device = len(counts), CODEBOOK_SIZE, counts.device
    occupied = counts > 0
    centres = low + (torch.arange(bins, device=device) + 0.5) * (span / bins)
    means = torch.where(occupied, sums / counts.clamp_min(1), centres).clamp(low, low + span)
    weights = torch.where(occupied, counts.pow(CODEBOOK_ALPHA), 0.0)
    high = low + span
    # Start from the weighted quantiles.
    cumulative = weights.cumsum(0)
    targets = (torch.arange(k, device=device) + 0.5) * (cumulative[-1] / k)
    codebook = means[torch.searchsorted(cumulative, targets).clamp(max=bins - 1)]
    for _ in range(CODEBOOK_ITERATIONS):
        codebook = _pin(codebook, low, high)
        nearest = torch.bucketize(means, (codebook[1:] + codebook[:-1]) / 2)
        total = torch.zeros(k, device=device).index_add_(0, nearest, weights * means)
        mass = torch.zeros(k, device=device).index_add_(0, nearest, weights)
        codebook = torch.where(mass > 0, total / mass.clamp_min(1e-30), codebook).sort().values
    return _pin(codebook, low, high)


def _pin(codebook: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return torch.cat([low[None], codebook[1:-1], high[None]])
