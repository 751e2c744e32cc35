"""Parity with Apple's reference implementation (the `sharp` package) on the real weights.

Runs Apple's predictor as its `sharp predict` does (create_predictor(PredictorParams()),
load_state_dict, eval, forward, unproject_gaussians) and this project's network on one fixed
input and checkpoint, and compares the metric Gaussians at every SUBSAMPLE-th Gaussian and the
disparity at every 8th pixel, with the golden tolerances. Apple's package is optional: the
Dockerfile installs it behind a build argument.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.io.checkpoint import read_state_dict
from engine.network import SharpNetwork
from engine.runtime.predictor import network_gaussians
from engine.runtime.validation import (
    GOLDEN_TOLERANCES,
    Compared,
    covariances6,
    exceeded,
    json_errors,
    max_errors,
    reference_output,
    validation_input,
)
from engine.splats.gaussians import postprocess

logger = logging.getLogger(__name__)

SUBSAMPLE = 64  # 18,432 of the official model's 1,179,648 Gaussians, as in the golden fixtures
DISPARITY_STRIDE = 8


def apple_available() -> bool:
    return (
        importlib.util.find_spec("sharp") is not None
        and importlib.util.find_spec("sharp.models") is not None
    )


def compare_with_apple(
    network: SharpNetwork, checkpoint: Path, device: torch.device
) -> dict[str, Any]:
    """Max errors of this network against Apple's on the validation input; `passed` when all
    are within the golden tolerances. Needs Apple's `sharp` package and the official config."""
    from sharp.models import PredictorParams, create_predictor
    from sharp.utils.gaussians import Gaussians3D, unproject_gaussians

    start = time.perf_counter()
    resolution = network.config.internal_resolution
    image, disparity_factor = validation_input(resolution, device)
    # The validation photo is square, `resolution` wide, with this focal length in pixels.
    focal_length_px = float(disparity_factor[0]) * resolution

    apple = create_predictor(PredictorParams())
    apple.load_state_dict(read_state_dict(checkpoint))  # memory-mapped: no second 2.8 GB copy
    apple = apple.eval().to(device)
    captured: dict[str, torch.Tensor] = {}

    def keep_disparity(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured["disparity"] = output.disparity  # returns None: the output stays as it is

    hook = apple.monodepth_model.register_forward_hook(keep_disparity)
    with torch.no_grad():
        apple_ndc = apple(image, disparity_factor)
    hook.remove()
    del apple
    subsampled = Gaussians3D(*(t[:, ::SUBSAMPLE] for t in apple_ndc))
    intrinsics = torch.tensor(
        [
            [focal_length_px, 0.0, resolution / 2, 0.0],
            [0.0, focal_length_px, resolution / 2, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        device=device,
    )
    apple_metric = unproject_gaussians(
        subsampled, torch.eye(4, device=device), intrinsics, (resolution, resolution)
    )

    output = reference_output(network, (image, disparity_factor))
    ours = network_gaussians(output).index(
        torch.arange(0, output.means.shape[1], SUBSAMPLE, device=device)
    )
    ours = postprocess(
        ours, focal_length_px=focal_length_px, image_width=resolution, image_height=resolution
    )

    def first(t: torch.Tensor) -> torch.Tensor:
        return t[0].float()

    stride = DISPARITY_STRIDE
    theirs = Compared(
        captured["disparity"][0, :, ::stride, ::stride],
        first(apple_metric.mean_vectors),
        covariances6(first(apple_metric.quaternions), first(apple_metric.singular_values)),
        first(apple_metric.colors),
        first(apple_metric.opacities),
    )
    mine = Compared(
        output.disparity[0, :, ::stride, ::stride],
        ours.means,
        covariances6(ours.quaternions, ours.scales),
        ours.colors,
        ours.opacities,
    )
    errors = max_errors(theirs, mine)
    over = exceeded(errors, GOLDEN_TOLERANCES)
    result = {
        "passed": not over,
        "max_errors": json_errors(errors),
        "tolerances": asdict(GOLDEN_TOLERANCES),
        "exceeded": over,
        "subsample": SUBSAMPLE,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
    }
    logger.info("Parity with Apple's sharp: %s", result)
    return result
