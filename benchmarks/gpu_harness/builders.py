"""The backends the acceptance run times, each built into a forward with its build details.

Artifact backends (export, aoti, tensorrt) are the engine's own (engine.runtime.backends):
built, saved and loaded back exactly as the build tool and the worker do. Eager runs the
network in the process; torch.compile (`compile`) is measured for comparison only, the
worker never serves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_harness.measure import synchronize
from engine.network import SharpOutput
from engine.runtime.artifacts import runtime_versions
from engine.runtime.backends import (
    BACKENDS,
    BuildContext,
    NetworkFn,
    eager_forward,
    export_network,
)
from engine.runtime.precision import PrecisionPlan

# The acceptance run's backend kinds and the engine's artifact backend behind each.
ARTIFACT_KINDS = {"export": "exported", "aoti": "compiled", "tensorrt": "tensorrt"}
KINDS = ("eager", "export", "compile", "aoti", "tensorrt")
COMPILING = ("compile", "aoti", "tensorrt")  # kinds whose build costs minutes
PRECISIONS = ("fp32", "fp16", "bf16")
BROKEN = "broken-fp32"  # --inject-failure: a backend that raises, to check failures are reported

Built = tuple[NetworkFn, dict[str, Any]]


@dataclasses.dataclass
class Context:
    network: torch.nn.Module  # eager float32, on `device`
    device: torch.device
    inputs: tuple[torch.Tensor, torch.Tensor]  # the validation photo
    args: argparse.Namespace
    workdir: Path  # large temporary artifacts (never under --out: its files are copied back)
    photo: bytes  # the request's encoded photo
    reference: SharpOutput | None = None


def build_eager(ctx: Context, plan: PrecisionPlan) -> Built:
    return eager_forward(ctx.network, plan), {}


def build_artifact(kind: str, ctx: Context, plan: PrecisionPlan) -> Built:
    """Export the plan's network, build the engine's artifact, load it back as the worker does."""
    backend = BACKENDS[ARTIFACT_KINDS[kind]]
    backend.require(ctx.device)  # BackendUnavailable: skipped
    began = time.perf_counter()
    program = export_network(eager_forward(ctx.network, plan), ctx.inputs)
    exported = time.perf_counter()
    path = ctx.workdir / f"{kind}-{plan.precision}{backend.suffix}"
    context = BuildContext(
        ctx.inputs,
        ctx.device,
        runtime_versions()["tensorrt"],
        workspace_gb=ctx.args.trt_workspace_gb,
    )
    backend.build(program, path, context)
    del program
    built = time.perf_counter()
    forward = backend.load(path, ctx.device)
    info = {
        "export_s": round(exported - began, 2),
        "compile_s": round(built - exported, 2),
        "load_s": round(time.perf_counter() - built, 2),
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }
    path.unlink()
    return forward, info


def build_compile(ctx: Context, plan: PrecisionPlan) -> Built:
    """torch.compile of the whole network as one graph (fixed shapes); its first call compiles.
    If it does not trace as one graph, compiles with graph breaks and says why."""
    network = eager_forward(ctx.network, plan)
    info: dict[str, Any] = {"mode": ctx.args.compile_mode}
    for fullgraph in (True, False):
        compiled = torch.compile(
            network, mode=ctx.args.compile_mode, fullgraph=fullgraph, dynamic=False
        )
        began = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(*ctx.inputs)
            synchronize(ctx.device)
        except Exception as error:
            graph_break = "graph break" in str(error).lower() or _is_unsupported(error)
            if not (fullgraph and graph_break):
                raise
            info["graph_breaks"] = first_line(error)
            torch._dynamo.reset()
            continue
        info["fullgraph"] = fullgraph
        info["first_call_s"] = round(time.perf_counter() - began, 2)
        return compiled, info
    raise AssertionError("unreachable")


def _is_unsupported(error: BaseException) -> bool:
    unsupported = getattr(getattr(torch, "_dynamo", None), "exc", None)
    return unsupported is not None and isinstance(error, unsupported.Unsupported)


def build_broken(ctx: Context, plan: PrecisionPlan) -> Built:
    raise RuntimeError("injected failure (--inject-failure): this backend always raises")


def build(kind: str, ctx: Context, plan: PrecisionPlan) -> Built:
    if kind in ARTIFACT_KINDS:
        return build_artifact(kind, ctx, plan)
    return {"eager": build_eager, "compile": build_compile, "broken": build_broken}[kind](ctx, plan)


def parse_backend(name: str) -> tuple[str, str]:
    kind, _, precision = name.partition("-")
    if kind not in (*KINDS, "broken") or precision not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"backend {name!r}: expected KIND-PRECISION, KIND one of {', '.join(KINDS)}, "
            f"PRECISION one of {', '.join(PRECISIONS)}"
        )
    return kind, precision


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]
