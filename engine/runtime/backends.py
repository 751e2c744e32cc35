"""The ways to run the network, each a callable (image, disparity_factor) -> SharpOutput.

  * eager: the PyTorch network in the process, float32 or a half-precision plan. No build.
  * exported: a saved `torch.export` program. No speed-up; it exercises the whole
    build-load-validate-switch path on any machine, the CPU included.
  * compiled: an AOTInductor package: Inductor's kernels compiled ahead of time by the build
    tool, loaded here without compiling anything.
  * tensorrt: a TensorRT engine saved by torch-tensorrt.

Each artifact backend is one class with everything about it: its name (SHARP_BACKEND and the
artifact kind), file suffix, build (from an exported program, in the build tool's process only)
and load (quick, never compiles). The worker, the build tool and the GPU acceptance run all go
through `BACKENDS`. Artifact modules return plain tuples (tuples survive save/load, ONNX and
TensorRT without registering SharpOutput with pytree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from engine.network import SharpOutput, TupleOutputs
from engine.runtime.files import write_atomic
from engine.runtime.precision import PrecisionPlan, mixed_network
from engine.runtime.tensorrt import (
    BackendUnavailable,
    as_network,
    compile_tensorrt,
    import_tensorrt,
    load_tensorrt,
    save_tensorrt,
    timing_cache_path,
)

NetworkFn = Callable[[torch.Tensor, torch.Tensor], SharpOutput]
NetworkInputs = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BuildContext:
    """What a build needs beside the program: the example inputs and the build's resources."""

    inputs: NetworkInputs
    device: torch.device
    tensorrt_version: str = ""
    workspace_gb: float = 4.0


class ArtifactBackend:
    """One kind of saved artifact: its name, file suffix, build and load."""

    name: ClassVar[str]
    suffix: ClassVar[str]
    needs_cuda: ClassVar[bool] = False

    def require(self, device: torch.device) -> None:
        """Raise BackendUnavailable, with the reason, when this backend cannot run here."""
        if self.needs_cuda and device.type != "cuda":
            raise BackendUnavailable(f"{self.name} artifacts are built for CUDA here")

    def build(
        self, program: torch.export.ExportedProgram, target: Path, context: BuildContext
    ) -> None:
        """Compile `program` and write the artifact to `target` atomically."""
        raise NotImplementedError

    def load(self, path: Path, device: torch.device) -> NetworkFn:
        """The forward of a saved artifact; raises with the reason when it cannot load here."""
        raise NotImplementedError


class ExportedBackend(ArtifactBackend):
    name = "exported"
    suffix = ".pt2"

    def build(
        self, program: torch.export.ExportedProgram, target: Path, context: BuildContext
    ) -> None:
        write_atomic(target, lambda path: torch.export.save(program, path))

    def load(self, path: Path, device: torch.device) -> NetworkFn:
        program = torch.export.load(path)
        return as_network(move_to_device_pass(program, device).module())


class CompiledBackend(ArtifactBackend):
    """AOTInductor: Inductor's kernels compiled ahead of time into a package."""

    name = "compiled"
    suffix = ".pt2"
    needs_cuda = True

    def build(
        self, program: torch.export.ExportedProgram, target: Path, context: BuildContext
    ) -> None:
        write_atomic(
            target,
            lambda path: torch._inductor.aoti_compile_and_package(program, package_path=str(path)),
        )

    def load(self, path: Path, device: torch.device) -> NetworkFn:
        self.require(device)
        return as_network(torch._inductor.aoti_load_package(str(path)))


class TensorRTBackend(ArtifactBackend):
    name = "tensorrt"
    suffix = ".ep"
    needs_cuda = True

    def require(self, device: torch.device) -> None:
        import_tensorrt()  # BackendUnavailable when torch-tensorrt is absent
        super().require(device)

    def build(
        self, program: torch.export.ExportedProgram, target: Path, context: BuildContext
    ) -> None:
        cache = timing_cache_path(target.parent, context.device, context.tensorrt_version)
        module = compile_tensorrt(
            program, context.inputs, timing_cache=cache, workspace_gb=context.workspace_gb
        )
        save_tensorrt(module, target, context.inputs)

    def load(self, path: Path, device: torch.device) -> NetworkFn:
        self.require(device)
        return as_network(load_tensorrt(path))


BACKENDS: dict[str, ArtifactBackend] = {
    backend.name: backend for backend in (TensorRTBackend(), CompiledBackend(), ExportedBackend())
}


def artifact_backend(kind: str) -> ArtifactBackend:
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"artifact kind must be one of {', '.join(BACKENDS)}; got {kind!r}"
        ) from None


def export_network(network: nn.Module, inputs: NetworkInputs) -> torch.export.ExportedProgram:
    """torch.export of the network at the fixed shapes of `inputs`.

    Non-strict export swaps module parameters for fake tensors while it traces, so it must
    never run in a process that is serving with the same modules: only the build tool calls it.
    """
    with torch.no_grad():
        return torch.export.export(TupleOutputs(network).eval(), inputs, strict=False)


def eager_forward(network: nn.Module, plan: PrecisionPlan) -> NetworkFn:
    return network if plan.precision == "fp32" else mixed_network(network, plan)


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
