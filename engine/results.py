"""A prediction to the file the user asked for: optional pruning, then one format's encoder.

The CLI and the worker both call `encode_prediction`, so a file written by `sharp-runpod
predict` and one returned by a job are the same bytes for the same options.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from engine.runtime.predictor import Prediction
from engine.splats.formats import FORMATS, MEDIA_TYPE, EncodedSplat, encode
from engine.splats.formats.sog_budget import write_sog_within
from engine.splats.formats.spz import DEFAULT_VERSION as SPZ_DEFAULT_VERSION
from engine.splats.formats.spz import VERSIONS as SPZ_VERSIONS
from engine.splats.gaussians import Gaussians
from engine.splats.pruning import prune

PLY_LAYOUTS = ("standard", "sharp")


class EmptyResultError(ValueError):
    """Pruning left no Gaussian: a client error, since the options asked for it."""


class NonFiniteError(ValueError):
    """Gaussians hold NaN or infinite numbers: no file is written from them."""


_FIELDS = ("means", "scales", "quaternions", "colors", "opacities")


def check_finite(gaussians: Gaussians, source: str) -> None:
    """Refuse Gaussians with any NaN or infinity, naming how many and where."""
    tensors = dict(zip(_FIELDS, gaussians.tensors(), strict=True))
    # A NaN or infinity makes the sum non-finite, so a finite sum clears a tensor in one fast
    # pass; a sum that overflows from finite values is settled by the exact test.
    fields = [
        name
        for name, tensor in tensors.items()
        if not bool(tensor.sum().isfinite()) and not bool(tensor.isfinite().all())
    ]
    if not fields:
        return
    bad = torch.zeros(len(gaussians), dtype=torch.bool, device=gaussians.means.device)
    for name in fields:
        bad |= ~tensors[name].reshape(len(gaussians), -1).isfinite().all(dim=1)
    raise NonFiniteError(
        f"{source} holds NaN or infinite values in {int(bad.sum()):,} of "
        f"{len(gaussians):,} Gaussians ({', '.join(fields)}); no file was written"
    )


# What each option accepts, in words; the request's field guide and the CLI's messages use it.
OPTION_RULES: dict[str, str] = {
    "format": f"one of {' | '.join(FORMATS)}",
    "ply_layout": f"one of {' | '.join(PLY_LAYOUTS)}",
    "spz_version": f"one of {' | '.join(map(str, SPZ_VERSIONS))}",
    "max_gaussians": "an integer >= 1",
    "min_opacity": "a number from 0 to 1",
    "prune_to_fit": "true or false",
}


class OptionError(ValueError):
    """An output option its rule refuses; `option` names the OutputOptions field."""

    def __init__(self, option: str, value: object) -> None:
        self.option = option
        self.value = value
        super().__init__(self.describe(option))

    def describe(self, name: str) -> str:
        """The message, with the option called what the caller's user calls it."""
        shown = repr(self.value)
        if len(shown) > 40:
            shown = f"{shown[:40]}..."
        return f"{name} must be {OPTION_RULES[self.option]}, got {shown}"


@dataclass(frozen=True)
class OutputOptions:
    """What to write; every instance is checked, so the worker and the CLI share the rules."""

    format: str = "ply"  # one of engine.splats.formats.FORMATS
    ply_layout: str = "standard"  # one of PLY_LAYOUTS
    spz_version: int = SPZ_DEFAULT_VERSION
    max_gaussians: int | None = None
    min_opacity: float | None = None
    prune_to_fit: bool = True  # .sog: keep fewer Gaussians when the coarsest precision won't fit

    @classmethod
    def given(cls, **fields: Any) -> OutputOptions:
        """Options from fields that may be None (not given), which take their defaults."""
        return cls(**{name: value for name, value in fields.items() if value is not None})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise OptionError("format", self.format)
        if self.ply_layout not in PLY_LAYOUTS:
            raise OptionError("ply_layout", self.ply_layout)
        if not _is_int(self.spz_version) or self.spz_version not in SPZ_VERSIONS:
            raise OptionError("spz_version", self.spz_version)
        if self.max_gaussians is not None and not (
            _is_int(self.max_gaussians) and self.max_gaussians >= 1
        ):
            raise OptionError("max_gaussians", self.max_gaussians)
        if self.min_opacity is not None:
            opacity = _finite(self.min_opacity)
            if opacity is None or not 0 <= opacity <= 1:
                raise OptionError("min_opacity", self.min_opacity)
            object.__setattr__(self, "min_opacity", opacity)
        if not isinstance(self.prune_to_fit, bool):
            raise OptionError("prune_to_fit", self.prune_to_fit)

    @property
    def prunes(self) -> bool:
        return self.max_gaussians is not None or self.min_opacity is not None


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class EncodedResult:
    splat: EncodedSplat
    num_gaussians: int  # in the file, after pruning
    sog: dict[str, Any] | None = None  # .sog only: its precision, budget and pruning


def encode_prediction(
    prediction: Prediction, options: OutputOptions, max_bytes: int | None = None
) -> EncodedResult:
    """Check, prune (when asked) and encode one prediction's Gaussians; a .sog within max_bytes."""
    gaussians = prediction.gaussians
    check_finite(gaussians, "the prediction")
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
