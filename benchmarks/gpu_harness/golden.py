"""The golden check: a backend's outputs against Apple's reference on one golden case."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from engine.io.fixture_weights import fixture_weights
from engine.io.images import decode_image
from engine.runtime.backends import NetworkFn
from engine.runtime.predictor import metric_gaussians, network_gaussians, run_network
from engine.runtime.staging import InputStaging
from engine.runtime.validation import (
    Compared,
    Validation,
    covariances6,
    exceeded,
    max_errors,
    tolerances_for,
)
from engine.splats.gaussians import Gaussians


@dataclasses.dataclass
class Golden:
    directory: Path
    expected: dict[str, np.ndarray]
    image_bytes: bytes

    @classmethod
    def load(cls, directory: Path) -> Golden:
        """A case folder of tests/data/golden/cases: expected.npz and input.png / input.jpg."""
        inputs = sorted(directory.glob("input.*"))
        missing = [n for n in ("expected.npz",) if not (directory / n).is_file()]
        if missing or not inputs:
            raise FileNotFoundError(
                f"{directory} lacks {', '.join(missing + ([] if inputs else ['input.png']))}: "
                "give a case folder of tests/data/golden/cases"
            )
        with np.load(directory / "expected.npz") as npz:
            expected = {name: npz[name] for name in npz.files}
        return cls(directory, expected, inputs[0].read_bytes())

    def make_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The deterministic weights the golden outputs were made with."""
        return fixture_weights(state_dict)

    def check(self, forward: NetworkFn, staging: InputStaging, precision: str) -> Validation:
        """The forward's errors on the golden photo against the reference, at `precision`'s
        tolerances, at the golden subsample, before and after unprojection (the larger)."""
        e = self.expected
        image = decode_image(self.image_bytes)
        if (image.height, image.width) != (int(e["image_height"]), int(e["image_width"])):
            raise ValueError(f"golden photo decoded as {image.width}x{image.height}")
        with torch.inference_mode():
            output = run_network(forward, staging, image)
            disparity = output.disparity[0, :, ::8, ::8]
            every = int(e["subsample_every"])
            pairs = []
            for gaussians, prefix in (
                (network_gaussians(output), "ndc_"),
                (metric_gaussians(output, image), ""),
            ):
                ours = _compared(disparity, gaussians.index(slice(None, None, every)))
                theirs = Compared(
                    *(
                        torch.from_numpy(np.asarray(a))
                        for a in (
                            e["disparity"],
                            e[f"{prefix}mean"],
                            e[f"{prefix}covariance6"],
                            e["color_linear"],
                            e["opacity"].reshape(-1),
                        )
                    )
                )
                pairs.append(max_errors(theirs, ours))
        errors = {name: max(p[name] for p in pairs) for name in pairs[0]}
        return Validation(precision, errors, tuple(exceeded(errors, tolerances_for(precision))))


def _compared(disparity: torch.Tensor, g: Gaussians) -> Compared:
    g = Gaussians(*(t.double().cpu() for t in g.tensors()))
    return Compared(
        disparity.float().cpu(),
        g.means,
        covariances6(g.quaternions, g.scales),
        g.colors,
        g.opacities.reshape(-1),
    )
