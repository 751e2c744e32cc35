"""One comparison of a backend's outputs with the eager float32 network, used everywhere.

The runtime validates every artifact with it before serving, the build tool before saving, and
the Apple parity check with the same tolerances: the golden fixtures' for float32, ten times
them for half precision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from engine.network import SharpOutput
from engine.runtime.precision import BLOCKS, PrecisionPlan, mixed_network
from engine.splats.gaussians import covariances_from

logger = logging.getLogger(__name__)

# The validation photo is square with focal length = width / 2: for it the metric Gaussians
# (engine.splats.gaussians.unproject scales by w / 2f and h / 2f) are exactly the network's output.
VALIDATION_DISPARITY_FACTOR = 0.5


@dataclass(frozen=True)
class Tolerances:
    """The golden tolerances: max abs error for disparity, colors, opacities; means relative to
    the median depth; covariances relative to each Gaussian's largest |entry|."""

    disparity: float = 1e-4
    colors: float = 1e-4
    opacities: float = 1e-4
    means: float = 1e-4
    covariances: float = 1e-3

    def scaled(self, factor: float) -> Tolerances:
        return Tolerances(**{name: value * factor for name, value in asdict(self).items()})


GOLDEN_TOLERANCES = Tolerances()


def tolerances_for(precision: str) -> Tolerances:
    """Golden tolerances for float32 backends, ten times them for half precision."""
    return GOLDEN_TOLERANCES if precision == "fp32" else GOLDEN_TOLERANCES.scaled(10)


def validation_input(resolution: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic photo: smooth colour gradients, stripes and a bright disc, in [0, 1]."""
    coords = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    disc = (((x - 0.62) ** 2 + (y - 0.55) ** 2) < 0.03).double()
    red = 0.5 + 0.35 * torch.sin(6 * math.pi * x) * torch.cos(4 * math.pi * y)
    green = 0.2 + 0.6 * x * (1 - y) + 0.2 * disc
    blue = 0.8 - 0.6 * y + 0.1 * torch.sin(40 * math.pi * x)
    image = torch.stack([red, green, blue]).clamp(0, 1).float()[None].to(device)
    factor = torch.tensor([VALIDATION_DISPARITY_FACTOR], dtype=torch.float32, device=device)
    return image, factor


def reference_output(network: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> SharpOutput:
    """The eager float32 network's output: what every backend is held to."""
    with torch.inference_mode():
        return SharpOutput(*(t.float() for t in network(*inputs)))


@dataclass(frozen=True)
class Compared:
    """What a comparison looks at, for one image: disparity and the Gaussians' attributes, the
    covariances as (N, 6) upper triangles (xx, xy, xz, yy, yz, zz)."""

    disparity: torch.Tensor
    means: torch.Tensor
    covariances6: torch.Tensor
    colors: torch.Tensor
    opacities: torch.Tensor


def covariances6(quaternions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, 6) upper triangles of the covariances of (N, 4) quaternions and (N, 3) scales."""
    return covariances_from(quaternions, scales)[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]


def max_errors(reference: Compared, candidate: Compared) -> dict[str, float]:
    """Largest errors in the units of `Tolerances`; inf where non-finite. The one error measure
    of runtime validation, the Apple parity check and the golden check."""
    with torch.inference_mode():
        ref, cand = (
            Compared(*(t.to(torch.float64) for t in vars(c).values()))
            for c in (reference, candidate)
        )
        cov_bound = ref.covariances6.abs().amax(1) + 1e-12
        errors = {
            "disparity": (cand.disparity - ref.disparity).abs().max(),
            "colors": (cand.colors - ref.colors).abs().max(),
            "opacities": (cand.opacities - ref.opacities).abs().max(),
            "means": (cand.means - ref.means).abs().max() / ref.means[:, 2].median(),
            "covariances": ((cand.covariances6 - ref.covariances6).abs().amax(1) / cov_bound).max(),
        }
        return {name: _finite(float(value)) for name, value in errors.items()}


def compared_output(output: SharpOutput) -> Compared:
    """The first image of a network output, as compared."""
    first = SharpOutput(*(t[0].float() for t in output))
    return Compared(
        first.disparity,
        first.means,
        covariances6(first.quaternions, first.scales),
        first.colors,
        first.opacities,
    )


def output_errors(reference: SharpOutput, candidate: SharpOutput) -> dict[str, float]:
    """Largest errors of the first image, in the units of `Tolerances`; inf where non-finite."""
    for name, a, b in zip(SharpOutput._fields, reference, candidate):
        if a[0].shape != b[0].shape:
            raise ValueError(f"{name}: shape {tuple(b[0].shape)}, expected {tuple(a[0].shape)}")
    return max_errors(compared_output(reference), compared_output(candidate))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def exceeded(errors: Mapping[str, float], tolerances: Tolerances) -> list[str]:
    """'name error > tolerance' for each error over its tolerance."""
    limits = asdict(tolerances)
    return [f"{k} {v:.3g} > {limits[k]:.3g}" for k, v in errors.items() if not v <= limits[k]]


def error_ratio(errors: Mapping[str, float], tolerances: Tolerances) -> float:
    """The largest error as a share of its tolerance (1 = at the limit)."""
    limits = asdict(tolerances)
    return max(value / limits[name] for name, value in errors.items())


def json_errors(errors: Mapping[str, float]) -> dict[str, float | None]:
    """Errors for JSON: non-finite becomes null."""
    return {k: (v if math.isfinite(v) else None) for k, v in errors.items()}


@dataclass(frozen=True)
class Validation:
    """The verdict on one candidate: its largest errors and those over tolerance."""

    precision: str
    max_errors: dict[str, float]
    exceeded: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.exceeded

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "max_errors": json_errors(self.max_errors),
            "tolerances": asdict(tolerances_for(self.precision)),
            "exceeded": list(self.exceeded),
        }

    def describe(self) -> str:
        errors = ", ".join(f"{k} {v:.2g}" for k, v in self.max_errors.items())
        return errors if self.passed else "beyond tolerance: " + ", ".join(self.exceeded)


def validate(reference: SharpOutput, candidate: SharpOutput, precision: str) -> Validation:
    """Compare `candidate` with the eager float32 `reference` at `precision`'s tolerances."""
    errors = output_errors(reference, candidate)
    return Validation(precision, errors, tuple(exceeded(errors, tolerances_for(precision))))


def measure_blocks(
    network: nn.Module,
    precision: str,
    inputs: tuple[torch.Tensor, torch.Tensor],
    reference: SharpOutput,
    blocks: Sequence[str] = BLOCKS,
) -> list[dict[str, Any]]:
    """Each block alone in `precision`, the rest in float32: the output errors it causes.

    Rows: block, ratio (largest error as a share of the half-precision tolerance), max_errors.
    """
    tolerances = tolerances_for(precision)
    rows = []
    for block in blocks:
        others = tuple(b for b in BLOCKS if b != block)
        candidate = mixed_network(network, PrecisionPlan(precision, others))
        with torch.inference_mode():
            errors = output_errors(reference, candidate(*inputs))
        ratio = error_ratio(errors, tolerances)
        logger.info("%s alone in %s: %.3g of the tolerance", block, precision, ratio)
        rows.append(
            {
                "block": block,
                "ratio": ratio if math.isfinite(ratio) else None,
                "max_errors": json_errors(errors),
            }
        )
    return rows
