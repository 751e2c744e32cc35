"""The ways to run the network, each a callable (image, disparity_factor) -> SharpOutput.

  * eager: the PyTorch network in the process, float32 or a half-precision plan. No build.
  * exported: a saved `torch.export` program. No speed-up; it exercises the whole
    build-load-validate-switch path on any machine, the CPU included.
  * compiled: an AOTInductor package: Inductor's kernels compiled ahead of time by the build
    tool, loaded here without compiling anything.
  * tensorrt: a TensorRT engine saved by torch-tensorrt.

Loading an artifact is quick and never compiles; building one is the build tool's job
(export/build_engine.py), in its own process. Artifact modules return plain tuples (tuples
survive save/load, ONNX and TensorRT without registering SharpOutput with pytree).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from engine.network import SharpOutput, TupleOutputs
from engine.runtime.precision import PrecisionPlan, mixed_network
from engine.runtime.tensorrt import BackendUnavailable, as_network, import_tensorrt, load_tensorrt

NetworkFn = Callable[[torch.Tensor, torch.Tensor], SharpOutput]
NetworkInputs = tuple[torch.Tensor, torch.Tensor]


def export_network(network: nn.Module, inputs: NetworkInputs) -> torch.export.ExportedProgram:
    """torch.export of the network at the fixed shapes of `inputs`.

    Non-strict export swaps module parameters for fake tensors while it traces, so it must
    never run in a process that is serving with the same modules: only the build tool calls it.
    """
    with torch.no_grad():
        return torch.export.export(TupleOutputs(network).eval(), inputs, strict=False)


def eager_forward(network: nn.Module, plan: PrecisionPlan) -> NetworkFn:
    return network if plan.precision == "fp32" else mixed_network(network, plan)


def load_artifact(kind: str, path: Path, device: torch.device) -> NetworkFn:
    """The forward of a saved artifact; raises with the reason when it cannot load here."""
    if kind == "exported":
        program = torch.export.load(path)
        return as_network(move_to_device_pass(program, device).module())
    if kind == "compiled":
        if device.type != "cuda":
            raise BackendUnavailable("AOTInductor packages are built for CUDA here")
        return as_network(torch._inductor.aoti_load_package(str(path)))
    if kind == "tensorrt":
        import_tensorrt()
        if device.type != "cuda":
            raise BackendUnavailable("TensorRT needs CUDA")
        return as_network(load_tensorrt(path))
    raise ValueError(f"unknown artifact kind {kind!r}")


def preferred_kind(backend: str, device: torch.device) -> str | None:
    """The artifact kind to serve with for SHARP_BACKEND, or None for eager only.

    auto: TensorRT where torch-tensorrt imports on a GPU, else AOTInductor on a GPU; on the
    CPU eager (a compiled CPU artifact buys little for this network and costs minutes).
    """
    if backend == "eager":
        return None
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return None
    try:
        import_tensorrt()
    except BackendUnavailable:
        return "compiled"
    return "tensorrt"
