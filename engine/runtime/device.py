"""Which device to run on: one answer for the worker, the command line and the build tool."""

from __future__ import annotations

from pathlib import Path

import torch


class DeviceError(RuntimeError):
    """The GPU asked for (or present) does not work."""


def gpu_visible() -> bool:
    # A GPU passed into a container shows as /dev/nvidia0..N even when CUDA then fails.
    return torch.cuda.is_available() or any(Path("/dev").glob("nvidia[0-9]*"))


def resolve_device(device: str | torch.device = "auto", *, setting: str = "device") -> torch.device:
    """`auto` is CUDA when a GPU is present, else the CPU; a present GPU that CUDA cannot use is
    an error (`setting` names where the choice came from), not a silent fall back to a CPU that
    takes minutes per image."""
    requested = str(device)
    if requested == "cpu" or (requested == "auto" and not gpu_visible()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"CUDA is not usable ({setting}={requested}): torch {torch.__version__} built for "
            f"CUDA {torch.version.cuda} sees no working GPU. Check that the container runs with "
            "a GPU (docker run --gpus all) and that the host driver supports this CUDA version "
            "(RunPod: allowedCudaVersions), or set SHARP_DEVICE=cpu."
        )
    return torch.device("cuda" if requested == "auto" else requested)
