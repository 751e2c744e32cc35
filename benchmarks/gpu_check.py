"""GPU acceptance run: every backend of the official network, timed, validated, in one command.

    python benchmarks/gpu_check.py [--golden DIR] [--out DIR]      (or: make gpu-check)
    python benchmarks/gpu_check.py --smoke                         (CPU, tiny model, ~1.5 min)

What it measures, per backend (eager fp32 / fp16 / bf16, torch.compile fp16 / bf16,
AOTInductor fp16, TensorRT fp16 where torch-tensorrt imports):

  * build: seconds to export / compile / load (for torch.compile, the first call);
  * forward: median of --rounds forwards after --warmup, batch 1, official input shape, timed
    with CUDA events around each synchronized call (perf_counter on the CPU);
  * validation: largest errors against eager fp32 on the validation photo (engine.runtime.
    validation: the golden tolerances for fp32, ten times them for half precision);
  * golden (with --golden): the same errors against Apple's reference on the golden case;
  * request: image bytes -> decode -> staging -> forward -> postprocess -> encode, to .sog and
    to .ply bytes, median of --request-rounds after one warm-up. One pipeline run per round
    serves both: each format's time is the shared part plus its own encoder;
  * peak GPU memory: torch.cuda.max_memory_allocated, reset before each backend (the resident
    float32 network is in it; `base_mb` is what was allocated when the backend started).

Half precision is the default precision plan (engine.runtime.precision: DEFAULT_FP32_BLOCKS
kept in float32). Weights are untrained and built in-process (no download); a forward's cost
does not depend on their values. The targets it reports as met or not: compiled half-precision
forward <= 60 ms and >= 3x eager fp32; whole request to .sog <= 150 ms warm; half-precision
outputs within 10x the golden tolerances.

Robustness: a backend that raises (an error, out of memory) is recorded with its reason and the
run goes on. An optional backend (all but the eager fp32 reference) is skipped when the time
spent plus its expected cost exceeds --budget-s (default 450 s); at --hard-limit-s (default
480 s) the backend running is stopped and the run ends. gpu_check.json and gpu_check.md are
rewritten after every backend, so a killed run still leaves what it measured.

Environment: only torch, numpy and Pillow are needed (no pillow-heif, TensorRT or network). It
inserts the repository root on sys.path, so a plain checkout runs it as a script.

Running it on a GPU machine
---------------------------
On a machine with an NVIDIA GPU and this repository checked out:

    make gpu-check                                   # every backend, within 8 minutes
    make gpu-check ARGS="--golden tests/data/golden/cases/full_astronaut"
    make gpu-check ARGS="--backends aoti-fp16 --budget-s 150 --hard-limit-s 200"

Results go to --out (default: $OUT when set, else out/gpu_check): gpu_check.json and
gpu_check.md, the table also printed. With --golden, the network carries the golden fixtures'
deterministic weights (engine.io.fixture_weights) for every backend and each backend's output is
compared with Apple's reference for that case. Check on the CPU first with --smoke.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the time budget counts from here, before torch is imported

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import numpy as np
import torch
from PIL import Image

from engine.io.checkpoint import build_untrained
from engine.io.fixture_weights import fixture_weights
from engine.io.images import decode_image
from engine.network import SharpOutput
from engine.network.config import SharpConfig
from engine.runtime.artifacts import gpu_identity, runtime_versions
from engine.runtime.backends import eager_forward, export_network, load_artifact
from engine.runtime.numerics import configure_numerics
from engine.runtime.precision import PrecisionPlan
from engine.runtime.predictor import network_gaussians
from engine.runtime.staging import InputStaging
from engine.runtime.tensorrt import (
    BackendUnavailable,
    as_network,
    compile_tensorrt,
    import_tensorrt,
)
from engine.runtime.validation import (
    Validation,
    error_ratio,
    exceeded,
    tolerances_for,
    validate,
    validation_input,
)
from engine.splats import formats
from engine.splats.gaussians import covariances_from, postprocess

NetworkFn = Callable[[torch.Tensor, torch.Tensor], SharpOutput]

KINDS = ("eager", "export", "compile", "aoti", "tensorrt")
COMPILING = ("compile", "aoti", "tensorrt")  # kinds whose build costs minutes
PRECISIONS = ("fp32", "fp16", "bf16")
REFERENCE = "eager-fp32"
GPU_BACKENDS = (
    "eager-fp32",
    "eager-fp16",
    "eager-bf16",
    "compile-fp16",
    "aoti-fp16",
    "compile-bf16",
    "tensorrt-fp16",
)
SMOKE_BACKENDS = ("eager-fp32", "eager-bf16", "export-bf16")
BROKEN = "broken-fp32"  # --inject-failure: a backend that raises, to check failures are reported

# The acceptance targets.
FORWARD_MS_TARGET = 60.0
SPEEDUP_TARGET = 3.0
REQUEST_SOG_MS_TARGET = 150.0
HALF_TOLERANCE_FACTOR = 10  # tolerances_for(half) = 10x golden

DEFAULT_BUDGET_S = 450.0
DEFAULT_HARD_LIMIT_S = 480.0
PHOTO = ROOT / "samples" / "coffee.jpg"


class HardLimit(BaseException):
    """Raised by SIGALRM at --hard-limit-s: BaseException, so no `except Exception` eats it."""


class Terminated(BaseException):
    """Raised by SIGTERM (a timeout killing the run): results are written before exiting."""


# ---------------------------------------------------------------------------------------------
# Measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            pixels, factor = staging.stage(image.rgb, image.focal_length_px / image.width)
            output = forward(pixels, factor)
            gaussians = postprocess(
                network_gaussians(SharpOutput(*output)),
                focal_length_px=image.focal_length_px,
                image_width=image.width,
                image_height=image.height,
            )
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
            del output, gaussians
    result: dict[str, Any] = {
        "rounds": rounds,
        "image": f"{image.width}x{image.height}",
        "decode_ms": _median(decode),
        "to_gaussians_ms": _median(shared),  # decode + stage + forward + postprocess
    }
    for name, (encoder, why) in encoders.items():
        if encoder is None:
            result[f"{name}_ms"] = None
            result[f"{name}_unavailable"] = why
            continue
        totals = [s + e for s, e in zip(shared, encode_ms[name])]
        result[f"{name}_ms"] = _median(totals)
        result[f"encode_{name}_ms"] = _median(encode_ms[name])
        result[f"{name}_bytes"] = sizes.get(name)
    return result


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# ---------------------------------------------------------------------------------------------
# The golden case (Apple's reference outputs for fixed weights and one photo)


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
        return fixture_weights(state_dict)

    def check(self, forward: NetworkFn, staging: InputStaging, precision: str) -> Validation:
        """The forward's errors on the golden photo against the reference, at `precision`'s
        tolerances (the units of engine.runtime.validation.Tolerances), at the golden subsample."""
        e = self.expected
        image = decode_image(self.image_bytes)
        if (image.height, image.width) != (int(e["image_height"]), int(e["image_width"])):
            raise ValueError(f"golden photo decoded as {image.width}x{image.height}")
        with torch.inference_mode():
            pixels, factor = staging.stage(image.rgb, image.focal_length_px / image.width)
            output = SharpOutput(*forward(pixels, factor))
            ndc = network_gaussians(output)
            metric = postprocess(
                ndc,
                focal_length_px=image.focal_length_px,
                image_width=image.width,
                image_height=image.height,
            )
            k = int(e["subsample_every"])
            disparity = output.disparity[0, :, ::8, ::8].float().cpu().numpy()
            sub = {
                name: {
                    field: getattr(g, field)[::k].double().cpu().numpy()
                    for field in ("means", "scales", "quaternions", "colors", "opacities")
                }
                for name, g in (("ndc", ndc), ("metric", metric))
            }
        errors = {
            "disparity": _max_abs(disparity, e["disparity"]),
            "colors": _max_abs(sub["ndc"]["colors"], e["color_linear"]),
            "opacities": _max_abs(sub["ndc"]["opacities"].reshape(-1), e["opacity"].reshape(-1)),
            "means": max(
                _max_abs(sub["ndc"]["means"], e["ndc_mean"])
                / float(np.median(e["ndc_mean"][:, 2])),
                _max_abs(sub["metric"]["means"], e["mean"]) / float(np.median(e["mean"][:, 2])),
            ),
            "covariances": max(
                _covariance_error(sub["ndc"], e["ndc_covariance6"]),
                _covariance_error(sub["metric"], e["covariance6"]),
            ),
        }
        errors = {k: (v if math.isfinite(v) else math.inf) for k, v in errors.items()}
        return Validation(precision, errors, tuple(exceeded(errors, tolerances_for(precision))))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _covariance_error(gaussians: dict[str, np.ndarray], expected6: np.ndarray) -> float:
    """Largest |error| of a Gaussian's covariance relative to its largest |entry|."""
    cov = covariances_from(
        torch.from_numpy(gaussians["quaternions"]), torch.from_numpy(gaussians["scales"])
    ).numpy()[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]
    bound = np.abs(expected6).max(axis=1) + 1e-12
    return float((np.abs(cov - expected6).max(axis=1) / bound).max())


# ---------------------------------------------------------------------------------------------
# Backends: each builds a forward (image, disparity_factor) -> SharpOutput, with build details


@dataclasses.dataclass
class Context:
    network: torch.nn.Module  # eager float32, on `device`
    device: torch.device
    inputs: tuple[torch.Tensor, torch.Tensor]  # the validation photo
    args: argparse.Namespace
    workdir: Path  # large temporary artifacts (never under --out: its files are copied back)
    photo: bytes  # the request's encoded photo
    reference: SharpOutput | None = None


def build_eager(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
    return eager_forward(ctx.network, plan), {}


def build_export(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
    """torch.export of the plan's network, run as the exported module (no speed-up): the graph
    that AOTInductor and TensorRT are given."""
    began = time.perf_counter()
    program = export_network(eager_forward(ctx.network, plan), ctx.inputs)
    return as_network(program.module()), {"export_s": round(time.perf_counter() - began, 2)}


def build_compile(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
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
            info["graph_breaks"] = _first_line(error)
            torch._dynamo.reset()
            continue
        info["fullgraph"] = fullgraph
        info["first_call_s"] = round(time.perf_counter() - began, 2)
        return compiled, info
    raise AssertionError("unreachable")


def _is_unsupported(error: BaseException) -> bool:
    unsupported = getattr(getattr(torch, "_dynamo", None), "exc", None)
    return unsupported is not None and isinstance(error, unsupported.Unsupported)


def build_aoti(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
    """AOTInductor: export, compile and package ahead of time, load as the worker does."""
    if ctx.device.type != "cuda":
        raise BackendUnavailable("AOTInductor packages are built for CUDA here")
    began = time.perf_counter()
    program = export_network(eager_forward(ctx.network, plan), ctx.inputs)
    exported = time.perf_counter()
    path = ctx.workdir / f"aoti-{plan.precision}.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    del program
    compiled = time.perf_counter()
    forward = load_artifact("compiled", path, ctx.device)
    info = {
        "export_s": round(exported - began, 2),
        "compile_s": round(compiled - exported, 2),
        "load_s": round(time.perf_counter() - compiled, 2),
        "package_mb": round(path.stat().st_size / 2**20, 1),
    }
    path.unlink()
    return forward, info


def build_tensorrt(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
    """torch-tensorrt, strongly typed from the plan's exported program (engine.runtime.tensorrt)."""
    import_tensorrt()  # BackendUnavailable when torch-tensorrt is absent: skipped
    if ctx.device.type != "cuda":
        raise BackendUnavailable("TensorRT needs CUDA")
    began = time.perf_counter()
    program = export_network(eager_forward(ctx.network, plan), ctx.inputs)
    exported = time.perf_counter()
    module = compile_tensorrt(
        program,
        ctx.inputs,
        timing_cache=ctx.workdir / "tensorrt-timing.cache",
        workspace_gb=ctx.args.trt_workspace_gb,
    )
    info = {
        "export_s": round(exported - began, 2),
        "compile_s": round(time.perf_counter() - exported, 2),
    }
    return as_network(module), info


def build_broken(ctx: Context, plan: PrecisionPlan) -> tuple[NetworkFn, dict[str, Any]]:
    raise RuntimeError("injected failure (--inject-failure): this backend always raises")


BUILDERS = {
    "eager": build_eager,
    "export": build_export,
    "compile": build_compile,
    "aoti": build_aoti,
    "tensorrt": build_tensorrt,
    "broken": build_broken,
}


def parse_backend(name: str) -> tuple[str, str]:
    kind, _, precision = name.partition("-")
    if kind not in BUILDERS or precision not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"backend {name!r}: expected KIND-PRECISION, KIND one of {', '.join(KINDS)}, "
            f"PRECISION one of {', '.join(PRECISIONS)}"
        )
    return kind, precision


def release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so that the next backend starts clean."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_backend(ctx: Context, name: str, staging: InputStaging, golden: Golden | None) -> dict:
    """One backend's row: build, forward timing, validation, golden, request, memory."""
    kind, precision = parse_backend(name)
    plan = PrecisionPlan.for_precision(precision)
    device, args = ctx.device, ctx.args
    row: dict[str, Any] = {"backend": name, "kind": kind, "precision": plan.describe()}
    release(device)
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    began = time.perf_counter()
    forward = None
    try:
        forward, info = BUILDERS[kind](ctx, plan)
        row["build"] = info
        row["build_s"] = round(time.perf_counter() - began, 2)

        def keep_reference(output: SharpOutput) -> None:
            if name == REFERENCE:
                ctx.reference = SharpOutput(*(t.float().clone() for t in output))

        times, output = time_forward(
            forward,
            ctx.inputs,
            device,
            warmup=args.warmup,
            rounds=args.rounds,
            on_first=keep_reference,
        )
        row["forward_ms"] = _median(times)
        row["forward_min_ms"] = round(min(times), 3)
        row["forward_rounds"] = len(times)
        if ctx.reference is None:
            raise RuntimeError(f"no reference: {REFERENCE} has not run")
        verdict = validate(ctx.reference, output, plan.precision)
        row["validation"] = {**verdict.to_json(), "ratio": _ratio(verdict)}
        del output
        if golden is not None:
            verdict = golden.check(forward, staging, plan.precision)
            row["golden"] = {**verdict.to_json(), "ratio": _ratio(verdict)}
        if args.requests == "all" or name == REFERENCE:
            row["request"] = time_requests(
                forward,
                ctx.photo,
                staging,
                device,
                warmup=args.request_warmup,
                rounds=args.request_rounds,
            )
        row["status"] = "ok"
    except BackendUnavailable as error:
        row.update(status="skipped", reason=_first_line(error))
    except torch.cuda.OutOfMemoryError as error:
        row.update(status="oom", reason=_first_line(error))
    except HardLimit:
        row.update(status="timeout", reason=f"stopped at --hard-limit-s {args.hard_limit_s:g}")
        raise
    except Exception as error:
        row.update(status="failed", reason=_first_line(error), traceback=_traceback(error))
    finally:
        row["seconds"] = round(time.perf_counter() - began, 2)
        del forward
        try:  # a failed kernel can leave the CUDA context unusable: keep the row's reason
            if cuda:
                row["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                row["base_mb"] = round(base / 2**20)
            release(device)
        except Exception as error:
            row["cleanup_error"] = _first_line(error)
    return row


def _ratio(verdict: Validation) -> float | None:
    ratio = error_ratio(verdict.max_errors, tolerances_for(verdict.precision))
    return round(ratio, 4) if math.isfinite(ratio) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:]


# ---------------------------------------------------------------------------------------------
# Budget, targets, report


def budget_refusal(elapsed: float, expected: float, budget: float) -> str | None:
    """Why an optional backend is not started (None: start it)."""
    if elapsed + expected > budget:
        more = f" + ~{expected:.0f} s expected" if expected else ""
        return f"time budget: {elapsed:.0f} s elapsed{more} > --budget-s {budget:g}"
    return None


def expected_seconds(kind: str, rows: Sequence[dict]) -> float:
    """A backend's expected cost: the longest backend of its family so far (compiling or not)."""
    family = kind in COMPILING
    done = [r["seconds"] for r in rows if "seconds" in r and (r["kind"] in COMPILING) == family]
    return max(done, default=0.0)


def _ok(row: dict) -> bool:
    return row.get("status") == "ok"


def _passed(row: dict) -> bool:
    return (
        _ok(row) and row["validation"]["passed"] and row.get("golden", {"passed": True})["passed"]
    )


def evaluate_targets(rows: Sequence[dict], golden: bool) -> list[dict[str, Any]]:
    """The acceptance targets, each with its value, the backend it came from and met (None
    when nothing measured it)."""
    by_name = {r["backend"]: r for r in rows}
    reference = by_name.get(REFERENCE, {})
    eager_ms = reference.get("forward_ms") if _ok(reference) else None
    ran = [
        r for r in rows if r["kind"] in COMPILING and not r["backend"].endswith("fp32") and _ok(r)
    ]
    best = min((r for r in ran if _passed(r)), key=lambda r: r["forward_ms"], default=None)
    targets = []
    forward = {"target": f"compiled half-precision forward <= {FORWARD_MS_TARGET:g} ms"}
    speedup = {"target": f"compiled half-precision forward >= {SPEEDUP_TARGET:g}x eager fp32"}
    if best is None:
        why = "no compiled half-precision backend " + ("passed validation" if ran else "ran")
        forward.update(value=None, backend=None, met=False if ran else None, note=why)
        speedup.update(value=None, backend=None, met=False if ran else None, note=why)
    else:
        forward.update(
            value=best["forward_ms"],
            backend=best["backend"],
            met=best["forward_ms"] <= FORWARD_MS_TARGET,
        )
        ratio = eager_ms / best["forward_ms"] if eager_ms and best["forward_ms"] else None
        speedup.update(
            value=round(ratio, 2) if ratio else None,
            backend=best["backend"],
            met=None if ratio is None else ratio >= SPEEDUP_TARGET,
        )
    targets += [forward, speedup]

    requests = [
        r for r in rows if _passed(r) and (r.get("request") or {}).get("sog_ms") is not None
    ]
    fastest = min(requests, key=lambda r: r["request"]["sog_ms"], default=None)
    request = {
        "target": f"whole request, image bytes -> .sog bytes <= {REQUEST_SOG_MS_TARGET:g} ms (warm)"
    }
    if fastest is None:
        note = (
            next(
                (r["request"].get("sog_unavailable") for r in rows if _ok(r) and r.get("request")),
                None,
            )
            or "no backend that passed validation measured it"
        )
        request.update(value=None, backend=None, met=None, note=note)
    else:
        value = fastest["request"]["sog_ms"]
        request.update(value=value, backend=fastest["backend"], met=value <= REQUEST_SOG_MS_TARGET)
    targets.append(request)

    half = [r for r in rows if _ok(r) and not r["backend"].endswith("fp32")]
    accuracy = {
        "target": f"half-precision outputs within {HALF_TOLERANCE_FACTOR}x golden tolerances"
        + ("" if golden else " (vs eager fp32; no --golden)")
    }
    failing = [r["backend"] for r in half if not _passed(r)]
    ratios = [
        math.inf if check["ratio"] is None else check["ratio"]
        for r in half
        for check in (r["validation"], r.get("golden"))
        if check
    ]
    worst = max(ratios, default=None)
    accuracy.update(
        value=None if worst is None or worst == math.inf else worst,
        unit="largest error / half-precision tolerance",
        backend=", ".join(failing) or None,
        met=None if not half else not failing,
    )
    targets.append(accuracy)
    return targets


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _verdict(check: dict | None) -> str:
    if not check:
        return "-"
    if check["passed"]:
        return f"pass ({_fmt(check.get('ratio'), 2)})"
    return "FAIL: " + "; ".join(check["exceeded"])


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = env["versions"]
    capability = f", sm {env['capability']}" if env["capability"] else ""
    summary = (
        f"torch {versions['torch']}, CUDA {versions['cuda'] or '-'}, "
        f"cuDNN {versions['cudnn'] or '-'}, TensorRT {versions['tensorrt'] or '-'}; "
        f"config {report['config']} ({report['resolution']} px, "
        f"{report['num_gaussians']:,} Gaussians); {'SMOKE (CPU) ' if report['smoke'] else ''}"
        f"{report['state']} after {report['elapsed_s']:.0f} s"
    )
    lines = [
        f"# gpu_check: {env['device']} ({env['gpu']}{capability})",
        "",
        summary,
        "",
        "| backend | status | build s | forward ms | x eager fp32 | request .sog ms "
        + "| request .ply ms | peak MB | validation (max error / tolerance) | golden |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = next((r for r in report["backends"] if r["backend"] == REFERENCE and _ok(r)), None)
    for row in report["backends"]:
        request = row.get("request") or {}
        speedup = (
            reference["forward_ms"] / row["forward_ms"]
            if reference and row.get("forward_ms")
            else None
        )
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        lines.append(
            f"| {row['backend']} | {status.replace('|', '/')} | {_fmt(row.get('build_s'))} "
            f"| {_fmt(row.get('forward_ms'))} | {_fmt(speedup, 2)} | {_fmt(request.get('sog_ms'))} "
            f"| {_fmt(request.get('ply_ms'))} | {_fmt(row.get('peak_mb'))} "
            f"| {_verdict(row.get('validation'))} | {_verdict(row.get('golden'))} |"
        )
    lines += ["", "| target | value | backend | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[target["met"]]
        note = f" ({target['note']})" if target.get("note") else ""
        lines.append(
            f"| {target['target']} | {_fmt(target['value'], 2)} | {target['backend'] or '-'} "
            f"| {met}{note} |"
        )
    notes = sorted(
        {
            f"- .sog not measured: {r['request']['sog_unavailable']}"
            for r in report["backends"]
            if (r.get("request") or {}).get("sog_unavailable")
        }
    )
    if report["smoke"]:
        notes.append("- smoke run: CPU, tiny configuration, few rounds; the targets are for a GPU")
    if report.get("golden_error"):
        notes.append(f"- golden case not used: {report['golden_error']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each written to a temporary name and renamed."""
    report["elapsed_s"] = round(time.monotonic() - T0, 1)
    report["targets"] = evaluate_targets(report["backends"], report["golden"] is not None)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"),
        ("gpu_check.md", markdown(report)),
    ):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, out / name)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and validate every backend of the SHARP network (see the module docstring).",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, tiny configuration, eager fp32/bf16 and export bf16, one round "
        "each, the whole request for eager fp32 only",
    )
    parser.add_argument(
        "--config",
        choices=("official", "tiny"),
        default=None,
        help="network configuration (default: official; tiny with --smoke)",
    )
    parser.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda; cpu with --smoke)"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated KIND-PRECISION, KIND in {', '.join(KINDS)} (default: "
        f"{','.join(GPU_BACKENDS)}; smoke: {','.join(SMOKE_BACKENDS)}). "
        f"{REFERENCE} always runs first: it is the reference",
    )
    parser.add_argument("--skip-aoti", action="store_true", help="leave out AOTInductor backends")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode: default, max-autotune-no-cudagraphs, reduce-overhead, ...",
    )
    parser.add_argument(
        "--golden",
        type=Path,
        default=None,
        help="folder with a golden case's expected.npz and input.*, and weights.py",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: $OUT if set, else out/gpu_check)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed forwards (default 10; smoke 1)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed forwards first (default 3; smoke 0)"
    )
    parser.add_argument(
        "--request-rounds", type=int, default=None, help="timed requests (default 5; smoke 1)"
    )
    parser.add_argument(
        "--request-warmup", type=int, default=None, help="untimed requests (default 1; smoke 0)"
    )
    parser.add_argument(
        "--requests",
        choices=("all", "reference"),
        default=None,
        help=f"time the whole request for every backend or only {REFERENCE} "
        "(default: all; smoke: reference, the same code for every backend)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="no optional backend starts once the time spent plus its expected cost exceeds this",
    )
    parser.add_argument(
        "--hard-limit-s",
        type=float,
        default=DEFAULT_HARD_LIMIT_S,
        help="the backend running at this many seconds is stopped and the run ends",
    )
    parser.add_argument(
        "--trt-workspace-gb", type=float, default=8.0, help="TensorRT builder workspace"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained weights")
    parser.add_argument(
        "--inject-failure",
        action="store_true",
        help=f"test hook: add a backend ({BROKEN}) that raises, to check failures are reported",
    )
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    defaults = {
        "config": "tiny" if smoke else "official",
        "device": "cpu" if smoke else "cuda",
        "rounds": 1 if smoke else 10,
        "warmup": 0 if smoke else 3,
        "request_rounds": 1 if smoke else 5,
        "request_warmup": 0 if smoke else 1,
        "requests": "reference" if smoke else "all",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1 or args.request_rounds < 1:
        raise SystemExit("--rounds and --request-rounds must be >= 1")
    names = (
        args.backends.split(",")
        if args.backends
        else list(SMOKE_BACKENDS if smoke else GPU_BACKENDS)
    )
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        try:
            parse_backend(name)
        except argparse.ArgumentTypeError as error:
            raise SystemExit(str(error)) from None
    if args.skip_aoti:
        names = [n for n in names if not n.startswith("aoti-")]
    if args.inject_failure:
        names.append(BROKEN)
    args.backend_names = [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("out") / "gpu_check"
    return args


def _on_signal(kind: type[BaseException]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        raise kind(f"signal {signum}")

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    configure_numerics()
    cuda_missing = device.type == "cuda" and not torch.cuda.is_available()
    gpu, capability = ("(no CUDA)", "") if cuda_missing else gpu_identity(device)
    config = SharpConfig() if args.config == "official" else SharpConfig.tiny()
    report: dict[str, Any] = {
        "smoke": args.smoke,
        "state": "starting",
        "config": args.config,
        "resolution": config.internal_resolution,
        "num_gaussians": config.num_gaussians,
        "environment": {
            "device": str(device),
            "gpu": gpu,
            "capability": capability,
            "versions": runtime_versions(),
            "python": platform.python_version(),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "numerics": configure_numerics(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)"),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "golden": None,
        "backends": [
            {"backend": n, "kind": parse_backend(n)[0], "status": "pending"}
            for n in args.backend_names
        ],
    }
    write_report(out, report)
    if cuda_missing:
        report["state"] = "failed: CUDA is not available (use --smoke on a CPU)"
        write_report(out, report)
        print(report["state"], file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_signal(Terminated))
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _on_signal(HardLimit))
        signal.setitimer(signal.ITIMER_REAL, max(args.hard_limit_s - (time.monotonic() - T0), 0.01))
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows = report["backends"]
    code = 0
    try:
        golden = None
        network = build_untrained(config, seed=args.seed)
        if args.golden is not None:
            try:
                golden = Golden.load(args.golden)
                network.load_state_dict(golden.make_weights(network.state_dict()))
                report["golden"] = str(args.golden)
            except Exception as error:
                golden = None
                report["golden_error"] = _first_line(error)
        network = network.to(device)
        inputs = validation_input(config.internal_resolution, device)
        ctx = Context(network, device, inputs, args, workdir, photo_bytes())
        staging = InputStaging(config.internal_resolution, device)
        report["state"] = "running"
        for index, name in enumerate(args.backend_names):
            kind = rows[index]["kind"]
            if name != REFERENCE:
                refusal = budget_refusal(
                    time.monotonic() - T0, expected_seconds(kind, rows[:index]), args.budget_s
                )
                if refusal:
                    rows[index].update(status="skipped", reason=refusal)
                    continue
            rows[index]["status"] = "running"
            write_report(out, report)
            print(f"[{time.monotonic() - T0:6.1f} s] {name} ...", flush=True)
            rows[index] = run_backend(ctx, name, staging, golden)
            _print_row(rows[index])
            write_report(out, report)
            if name == REFERENCE and not _ok(rows[index]):
                report["state"] = f"failed: the reference {REFERENCE} did not run"
                code = 2
                break
        else:
            report["state"] = "complete"
    except (HardLimit, Terminated) as stop:
        code = 3 if isinstance(stop, HardLimit) else 143
        why = "hard time limit" if isinstance(stop, HardLimit) else "terminated"
        report["state"] = f"stopped: {why}"
        for row in rows:
            if row["status"] in ("pending", "running"):
                row.update(
                    status="skipped" if row["status"] == "pending" else "timeout", reason=why
                )
    except Exception as error:
        report["state"] = f"failed: {_first_line(error)}"
        report["traceback"] = _traceback(error)
        code = 2
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(out, report)
    print()
    print((out / "gpu_check.md").read_text(), flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    if code in (3, 143):
        sys.stderr.flush()
        os._exit(code)  # compile workers may still be busy: do not wait for them at exit
    return code


def _print_row(row: dict) -> None:
    parts = [f"{row['backend']}: {row['status']}"]
    if row.get("reason"):
        parts.append(row["reason"])
    if row.get("forward_ms") is not None:
        parts.append(f"forward {row['forward_ms']:.1f} ms")
    if row.get("validation"):
        parts.append(f"validation {_verdict(row['validation'])}")
    parts.append(f"{row.get('seconds', 0):.1f} s")
    print("    " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
