"""A prediction to the file the user asked for: optional pruning, then one format's encoder.

The CLI and the worker both call `encode_prediction`, so a file written by `sharp-runpod
predict` and one returned by a job are the same bytes for the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.runtime.predictor import Prediction
from engine.splats.formats import MEDIA_TYPE, EncodedSplat, encode
from engine.splats.formats.sog_budget import write_sog_within
from engine.splats.formats.spz import DEFAULT_VERSION as SPZ_DEFAULT_VERSION
from engine.splats.pruning import prune

PLY_LAYOUTS = ("standard", "sharp")


class EmptyResultError(ValueError):
    """Pruning left no Gaussian: a client error, since the options asked for it."""


@dataclass(frozen=True)
class OutputOptions:
    format: str = "ply"  # one of engine.splats.formats.FORMATS
    ply_layout: str = "standard"  # one of PLY_LAYOUTS
    spz_version: int = SPZ_DEFAULT_VERSION
    max_gaussians: int | None = None
    min_opacity: float | None = None
    prune_to_fit: bool = True  # .sog: keep fewer Gaussians when the coarsest precision won't fit

    @property
    def prunes(self) -> bool:
        return self.max_gaussians is not None or self.min_opacity is not None


@dataclass(frozen=True)
class EncodedResult:
    splat: EncodedSplat
    num_gaussians: int  # in the file, after pruning
    sog: dict[str, Any] | None = None  # .sog only: its precision, budget and pruning


def encode_prediction(
    prediction: Prediction, options: OutputOptions, max_bytes: int | None = None
) -> EncodedResult:
    """Prune (when asked) and encode one prediction's Gaussians; a .sog within max_bytes."""
    gaussians = prediction.gaussians
    if options.prunes:
        gaussians = prune(
            gaussians,
            min_opacity=options.min_opacity,
            max_gaussians=options.max_gaussians,
            focal_length_px=prediction.focal_length_px,
        )
        if len(gaussians) == 0:
            raise EmptyResultError(
                f"min_opacity={options.min_opacity} leaves no Gaussian to return; use a lower value"
            )
    if options.format == "sog":
        fit = write_sog_within(
            gaussians.contiguous(),
            max_bytes=max_bytes,
            focal_length_px=prediction.focal_length_px,
            allow_pruning=options.prune_to_fit,
        )
        splat = EncodedSplat(fit.data, "sog", MEDIA_TYPE, ".sog")
        return EncodedResult(splat, fit.num_gaussians, fit.summary())
    splat = encode(
        gaussians,
        options.format,
        image_width=prediction.image_width,
        image_height=prediction.image_height,
        focal_length_px=prediction.focal_length_px,
        ply_layout=options.ply_layout,
        spz_version=options.spz_version,
    )
    return EncodedResult(splat, len(gaussians))
