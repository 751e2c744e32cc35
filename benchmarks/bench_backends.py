"""Network forward and whole request per backend and precision, batch 1, in one run.

    python -m pytest benchmarks/bench_backends.py --benchmark-enable \\
        --benchmark-json=bench_backends.json [--sharp-config auto|tiny|official]

Every backend/precision pair runs in the same session and the same benchmark groups
(`forward-<config>`, `request-<config>`), so eager and compiled are compared in one table;
the JSON holds each result with backend, precision, device and, on a GPU, peak GPU memory
(torch.cuda.max_memory_allocated) in extra_info. A pair the chain refuses (no CUDA, no
torch-tensorrt, outputs off tolerance) is skipped with the refusal's reason.

CPU: eager fp32 only (half precision is emulated on CPUs, minutes per forward). GPU: every
backend and precision, median of 20 after 3 warm-up rounds. The official configuration runs
where it fits (CUDA with 16 GB, or 16 GB of free RAM), else the tiny one; its weights are the
default random initialisation: a forward's cost does not depend on their values.
`--sharp-config` defaults to $SHARP_BENCH_CONFIG, else auto.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from engine.io.checkpoint import CheckpointInfo
from engine.network import SharpNetwork
from engine.network.config import SharpConfig
from engine.runtime.backends import (
    BACKEND_ORDER,
    PRECISIONS,
    BackendSettings,
    gpu_identity,
    validation_input,
)
from engine.runtime.predictor import SharpPredictor
from engine.splats.formats.ply import write_ply

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU_ROUNDS, GPU_WARMUP = 20, 3
OFFICIAL_MEMORY = 16 * 2**30


def sharp_config(config: pytest.Config) -> str:
    choice = config.getoption("--sharp-config", default=None) or os.environ.get(
        "SHARP_BENCH_CONFIG", "auto"
    )
    if choice != "auto":
        return choice
    if DEVICE.type == "cuda":
        fits = torch.cuda.get_device_properties(DEVICE).total_memory >= OFFICIAL_MEMORY
    else:
        fits = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >= OFFICIAL_MEMORY
    return "official" if fits else "tiny"


def rounds(config_name: str) -> tuple[int, int]:
    """(rounds, warm-up rounds): an official forward takes ~1.5 minutes on 2 CPU cores."""
    if DEVICE.type == "cuda":
        return GPU_ROUNDS, GPU_WARMUP
    return (1, 0) if config_name == "official" else (3, 1)


PAIRS = [(backend, precision) for backend in BACKEND_ORDER for precision in PRECISIONS]


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{b}-{p}" for b, p in PAIRS])
def subject(request: pytest.FixtureRequest) -> Iterator[tuple[SharpPredictor, str]]:
    """(predictor serving exactly this backend and precision, configuration name)."""
    backend, precision = request.param
    if DEVICE.type == "cpu" and (backend, precision) != ("eager", "fp32"):
        pytest.skip("CPU runs cover eager fp32 (the others need CUDA or emulate half precision)")
    name = sharp_config(request.config)
    config = SharpConfig() if name == "official" else SharpConfig.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = SharpNetwork(config).eval().requires_grad_(False)
    info = CheckpointInfo(f"random-init-{name}", None, config, untrained=True)
    settings = BackendSettings(backend=backend, precision=precision, background=False)
    predictor = SharpPredictor.from_network(network, DEVICE, info, settings)
    if (predictor.backend, predictor.precision) != (backend, precision):
        refused = [
            e
            for e in predictor.backend_report
            if e["backend"] == backend and e["precision"] == precision
        ]
        pytest.skip(
            f"{backend}/{precision} refused: {refused[-1]['reason'] if refused else 'not tried'}"
        )
    yield predictor, name
    del predictor, network
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    benchmark,
    timings: dict[str, float],
    subject: tuple[SharpPredictor, str],
    kind: str,
    fn: Callable[[], object],
) -> None:
    predictor, name = subject
    benchmark.group = f"{kind}-{name}"
    benchmark.extra_info.update(
        backend=predictor.backend,
        precision=predictor.precision,
        config=name,
        device=gpu_identity(DEVICE)[0],
        threads=torch.get_num_threads(),
    )
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    total, warmup = rounds(name)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=total, iterations=1, warmup_rounds=warmup)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_gpu_memory_mb"] = round(
            torch.cuda.max_memory_allocated() / 2**20
        )
    if benchmark.stats is not None:  # None under --benchmark-disable
        timings[f"{kind} {predictor.backend}/{predictor.precision}"] = benchmark.stats.stats.median


def _synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    return run


def test_network_forward(benchmark, timings, subject):
    predictor, _ = subject
    inputs = validation_input(predictor.resolution, DEVICE)
    forward = predictor.runtime.active.forward
    measure(benchmark, timings, subject, "forward", _synchronized(lambda: forward(*inputs)))


def test_whole_request(benchmark, timings, subject):
    """Encoded photo in, .ply bytes out: decode, stage, forward, unproject, encode."""
    predictor, _ = subject
    data = _photo(1024, 768)

    def request() -> bytes:
        prediction = predictor.predict(data)
        return write_ply(
            prediction.gaussians,
            image_width=prediction.image_width,
            image_height=prediction.image_height,
            focal_length_px=prediction.focal_length_px,
        )

    measure(benchmark, timings, subject, "request", request)


def _photo(width: int, height: int) -> bytes:
    """A JPEG with some structure (gradients and noise), as a phone photo would have."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
