"""One backend's row (build, forward timing, validation, golden, request, memory) and the
time budget that decides which optional backends start."""

from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.gpu_harness.builders import COMPILING, Context, build, first_line, parse_backend
from benchmarks.gpu_harness.golden import Golden
from benchmarks.gpu_harness.measure import median, time_forward, time_requests
from engine.network import SharpOutput
from engine.runtime.precision import PrecisionPlan
from engine.runtime.staging import InputStaging
from engine.runtime.tensorrt import BackendUnavailable
from engine.runtime.validation import Validation, error_ratio, tolerances_for, validate

REFERENCE = "eager-fp32"


class HardLimit(BaseException):
    """Raised by SIGALRM at --hard-limit-s: BaseException, so no `except Exception` eats it."""


class Terminated(BaseException):
    """Raised by SIGTERM (a timeout killing the run): results are written before exiting."""


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
        forward, info = build(kind, ctx, plan)
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
        row["forward_ms"] = median(times)
        row["forward_min_ms"] = round(min(times), 3)
        row["forward_rounds"] = len(times)
        if ctx.reference is None:
            raise RuntimeError(f"no reference: {REFERENCE} has not run")
        verdict = validate(ctx.reference, output, plan.precision)
        row["validation"] = {**verdict.to_json(), "ratio": ratio(verdict)}
        del output
        if golden is not None:
            verdict = golden.check(forward, staging, plan.precision)
            row["golden"] = {**verdict.to_json(), "ratio": ratio(verdict)}
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
        row.update(status="skipped", reason=first_line(error))
    except torch.cuda.OutOfMemoryError as error:
        row.update(status="oom", reason=first_line(error))
    except HardLimit:
        row.update(status="timeout", reason=f"stopped at --hard-limit-s {args.hard_limit_s:g}")
        raise
    except Exception as error:
        row.update(status="failed", reason=first_line(error), traceback=format_traceback(error))
    finally:
        row["seconds"] = round(time.perf_counter() - began, 2)
        del forward
        try:  # a failed kernel can leave the CUDA context unusable: keep the row's reason
            if cuda:
                row["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                row["base_mb"] = round(base / 2**20)
            release(device)
        except Exception as error:
            row["cleanup_error"] = first_line(error)
    return row


def ratio(verdict: Validation) -> float | None:
    value = error_ratio(verdict.max_errors, tolerances_for(verdict.precision))
    return round(value, 4) if math.isfinite(value) else None


def format_traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:]


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
