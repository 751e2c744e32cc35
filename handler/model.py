"""Getting the model onto a working device once per worker, before the first job."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.io.checkpoint import CheckpointError, HubFile
from engine.io.images import decode_image
from engine.runtime.device import DeviceError, resolve_device
from engine.runtime.predictor import SharpPredictor
from engine.settings import Settings

logger = logging.getLogger(__name__)

# Error text of CUDA failures that leave the device or its context unusable.
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "device-side assert",
    "illegal memory access",
)


def select_device(requested: str) -> torch.device:
    """The device to run on (engine.runtime.device), after a pre-flight check of the GPU."""
    device = resolve_device(requested, setting="SHARP_DEVICE")
    if device.type == "cuda" and not gpu_healthy(device):
        raise DeviceError(
            f"the GPU {torch.cuda.get_device_name(device)} failed a pre-flight computation; "
            "this worker cannot run jobs on it"
        )
    return device


def gpu_healthy(device: torch.device) -> bool:
    """A tiny computation on the device, synchronised so that errors surface here."""
    try:
        values = torch.arange(1024, dtype=torch.float32, device=device)
        ok = float(values.sum().item()) == 1023 * 1024 / 2
        torch.cuda.synchronize(device)
        return ok
    except Exception as error:  # any CUDA failure means the same: not healthy
        logger.error("GPU health check failed: %s", error)
        return False


def is_device_fault(error: BaseException, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_FAULT_MARKERS)


def checkpoint_spec(settings: Settings) -> str | None:
    """`hf://owner/repo[/file]` resolves to RunPod's model cache when the file is there."""
    spec = settings.engine.checkpoint
    if spec is None or not spec.startswith("hf://"):
        return spec
    cached = find_in_hf_cache(spec, settings.worker.hf_cache_dir)
    if cached is None:
        logger.info(
            "%s is not in the model cache %s; downloading it", spec, settings.worker.hf_cache_dir
        )
        return spec
    logger.info("Using %s from the model cache: %s", spec, cached)
    return str(cached)


def find_in_hf_cache(spec: str, hub_dir: Path) -> Path | None:
    """The file in a Hugging Face hub cache (models--owner--repo/snapshots/<rev>/file).

    The snapshot that refs/main names comes first, then the most recently written one.
    """
    try:
        hub_file = HubFile.parse(spec)
    except CheckpointError:
        return None  # malformed; the engine explains the expected form
    filename = hub_file.filename
    repo_dir = hub_dir / f"models--{hub_file.owner}--{hub_file.repo}"
    snapshots = repo_dir / "snapshots"
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        pinned = snapshots / main_ref.read_text().strip() / filename
        if pinned.is_file():
            return pinned
    candidates = [path for path in snapshots.glob(f"*/{filename}") if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def load_predictor(settings: Settings) -> SharpPredictor:
    """Check the device, load the checkpoint, start the runtime, and warm up once.

    The runtime serves eager at once and, when the engine of SHARP_BACKEND is not cached,
    builds it in a child process; the worker switches to it between jobs.
    """
    device = select_device(settings.engine.device)
    start = time.perf_counter()
    engine = dataclasses.replace(
        settings.engine, device=device.type, checkpoint=checkpoint_spec(settings)
    )
    predictor = SharpPredictor.from_settings(engine)
    logger.info(
        "Loaded %s on %s (%s, %s) in %.1f s%s",
        predictor.checkpoint.name,
        device,
        predictor.backend,
        predictor.precision,
        time.perf_counter() - start,
        " [UNTRAINED: not a real reconstruction]" if predictor.checkpoint.untrained else "",
    )
    warm_up(predictor)
    return predictor


def warm_up(predictor: SharpPredictor) -> None:
    """One prediction before the first job, so that lazy initialisation is not a job's cost."""
    start = time.perf_counter()
    predictor.predict(decode_image(_warm_up_image()))
    if predictor.device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("Warm-up prediction took %.1f s", time.perf_counter() - start)


def _warm_up_image() -> bytes:
    gradient = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()
