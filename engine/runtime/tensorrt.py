"""TensorRT through torch-tensorrt's dynamo frontend: compile (build tool only), save and load.

Compiling runs only in the build process (export/build_engine.py), never in a worker that
serves. Loading a saved engine is what the worker does; it needs the same GPU architecture
and TensorRT version as the build, which the artifact key guarantees.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.network import SharpOutput
from engine.runtime.files import write_atomic

NetworkInputs = tuple[torch.Tensor, torch.Tensor]


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (library missing, no CUDA)."""


def import_tensorrt() -> Any:
    try:
        import torch_tensorrt
    except ImportError as error:
        raise BackendUnavailable(
            f"torch_tensorrt is not installed ({error}); install torch-tensorrt matching torch "
            f"{torch.__version__.split('+')[0]}"
        ) from error
    return torch_tensorrt


def timing_cache_path(directory: Path, device: torch.device, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version: timings of one GPU mislead another."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{trt_version}").strip("-").lower()
    return directory / f"tensorrt-timing-{slug}.cache"


def compile_tensorrt(
    program: torch.export.ExportedProgram,
    inputs: NetworkInputs,
    *,
    timing_cache: Path,
    workspace_gb: float,
) -> torch.fx.GraphModule:
    """Compile an exported program, strongly typed, with a bounded builder workspace.

    The program already carries the precision plan's dtypes. torch-tensorrt >= 2.13 always
    builds strongly typed; 2.9-2.12 need `use_explicit_typing=True` for it. TF32 is off so
    float32 layers stay IEEE float32, and half-precision matmuls accumulate in float32 as
    cuBLAS does for the eager network. The shared timing cache is copied to a private file
    for the build and renamed back, so concurrent builds never see a half-written cache.
    """
    torch_tensorrt = import_tensorrt()
    half = any(
        getattr(node.meta.get("val"), "dtype", None) in (torch.float16, torch.bfloat16)
        for node in program.graph.nodes
    )
    private = timing_cache.with_name(timing_cache.name + ".build")
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(timing_cache, private)
    options: dict[str, Any] = {
        "arg_inputs": list(inputs),
        "disable_tf32": True,
        "use_fp32_acc": half,
        "timing_cache_path": str(private),
        "workspace_size": int(workspace_gb * (1 << 30)),
    }
    if "use_explicit_typing" in inspect.signature(torch_tensorrt.dynamo.compile).parameters:
        options["use_explicit_typing"] = True
    module = torch_tensorrt.dynamo.compile(program, **options)
    if private.exists():
        write_atomic(timing_cache, lambda target: shutil.copyfile(private, target))
        private.unlink()
    return module


def save_tensorrt(module: torch.fx.GraphModule, path: Path, inputs: NetworkInputs) -> None:
    """Save as an ExportedProgram with the engine embedded, atomically."""
    torch_tensorrt = import_tensorrt()

    def write(target: Path) -> None:
        # Protocol 4: the serialized engine holds all weights (over 1 GB for the official model).
        torch_tensorrt.save(
            module,
            str(target),
            output_format="exported_program",
            arg_inputs=list(inputs),
            pickle_protocol=4,
        )

    write_atomic(path, write)


def load_tensorrt(path: Path) -> Any:
    """The saved engine's module: called as module(image, disparity_factor) -> tuple."""
    return import_tensorrt().load(str(path)).module()


def as_network(module: Any) -> Any:
    """A tuple-returning module as the network's callable, returning SharpOutput."""
    return lambda image, disparity_factor: SharpOutput(*module(image, disparity_factor))
