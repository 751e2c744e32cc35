"""Timing: synchronized forwards, and whole requests from image bytes to encoded files."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.io.images import decode_image
from engine.network import SharpOutput
from engine.runtime.backends import NetworkFn
from engine.runtime.predictor import metric_gaussians, run_network
from engine.runtime.staging import InputStaging
from engine.splats import formats

PHOTO = Path(__file__).resolve().parents[2] / "samples" / "coffee.jpg"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def time_forward(
    forward: NetworkFn,
    inputs: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    *,
    warmup: int,
    rounds: int,
    on_first: Callable[[SharpOutput], None] | None = None,
) -> tuple[list[float], SharpOutput]:
    """Milliseconds of `rounds` synchronized forwards after `warmup`, and the last output.

    CUDA events on a GPU (around each call, the GPU idle before it, so launch overhead counts),
    perf_counter on the CPU. `on_first` sees the first call's output before the next call.
    """
    times: list[float] = []
    output = None
    with torch.inference_mode():
        for index in range(warmup + rounds):
            synchronize(device)
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                output = forward(*inputs)
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                began = time.perf_counter()
                output = forward(*inputs)
                elapsed = (time.perf_counter() - began) * 1000
            if index == 0 and on_first is not None:
                on_first(SharpOutput(*output))
            if index >= warmup:
                times.append(elapsed)
    return times, SharpOutput(*output)


def photo_bytes() -> bytes:
    """samples/coffee.jpg, else a generated 1024 x 768 JPEG with gradients and noise."""
    if PHOTO.is_file():
        return PHOTO.read_bytes()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024] / 1024
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 12, (768, 1024, 3))
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def splat_encoder(name: str) -> tuple[Callable[..., bytes] | None, str]:
    """(encode Gaussians to `name` bytes, '') through engine.splats.formats; (None, why) if absent."""
    if name in formats.FORMATS:
        return (lambda g, **meta: formats.encode(g, name, **meta).data), ""
    return None, f"{name!r} is not among engine.splats.formats.FORMATS {formats.FORMATS}"


def time_requests(
    forward: NetworkFn,
    data: bytes,
    staging: InputStaging,
    device: torch.device,
    *,
    warmup: int,
    rounds: int,
) -> dict[str, Any]:
    """The whole request per format: decode, stage, forward, postprocess (GPU synchronized),
    then each encoder. Medians in ms, and each encoding's size."""
    encoders = {name: splat_encoder(name) for name in ("sog", "ply")}
    shared, decode, encode_ms = [], [], {name: [] for name in encoders}
    sizes: dict[str, int] = {}
    with torch.inference_mode():
        for index in range(warmup + rounds):
            synchronize(device)
            began = time.perf_counter()
            image = decode_image(data)
            decoded = time.perf_counter()
            gaussians = metric_gaussians(run_network(forward, staging, image), image)
            synchronize(device)
            ready = time.perf_counter()
            meta = {
                "image_width": image.width,
                "image_height": image.height,
                "focal_length_px": image.focal_length_px,
            }
            for name, (encoder, _) in encoders.items():
                if encoder is None:
                    continue
                start = time.perf_counter()
                encoded = encoder(gaussians, **meta)
                if index >= warmup:
                    encode_ms[name].append((time.perf_counter() - start) * 1000)
                sizes[name] = len(encoded)
            if index >= warmup:
                shared.append((ready - began) * 1000)
                decode.append((decoded - began) * 1000)
            del gaussians
    result: dict[str, Any] = {
        "rounds": rounds,
        "image": f"{image.width}x{image.height}",
        "decode_ms": median(decode),
        "to_gaussians_ms": median(shared),  # decode + stage + forward + postprocess
    }
    for name, (encoder, why) in encoders.items():
        if encoder is None:
            result[f"{name}_ms"] = None
            result[f"{name}_unavailable"] = why
            continue
        totals = [s + e for s, e in zip(shared, encode_ms[name])]
        result[f"{name}_ms"] = median(totals)
        result[f"encode_{name}_ms"] = median(encode_ms[name])
        result[f"{name}_bytes"] = sizes.get(name)
    return result
