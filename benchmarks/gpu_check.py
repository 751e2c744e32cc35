"""GPU acceptance run: every backend of the official network, timed, validated, in one command.

    python benchmarks/gpu_check.py [--golden DIR] [--out DIR]      (or: make gpu-check)
    python benchmarks/gpu_check.py --smoke                         (CPU, tiny model, 1.5-10 min)

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

The parts live in benchmarks/gpu_harness: measure (timing), golden (the golden check),
builders (each backend; the artifact backends are the engine's own), run (one backend's row and
the budget) and report (targets, JSON and Markdown). This file is the command line.

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
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import torch

from benchmarks.gpu_harness.builders import (
    BROKEN,
    KINDS,
    Context,
    first_line,
    parse_backend,
)
from benchmarks.gpu_harness.golden import Golden
from benchmarks.gpu_harness.measure import photo_bytes
from benchmarks.gpu_harness.report import evaluate_targets, ok, print_row, write_report
from benchmarks.gpu_harness.run import (
    REFERENCE,
    HardLimit,
    Terminated,
    budget_refusal,
    expected_seconds,
    format_traceback,
    run_backend,
)
from engine.io.checkpoint import build_untrained
from engine.network import SharpOutput
from engine.network.config import SharpConfig
from engine.runtime.artifacts import gpu_identity, runtime_versions
from engine.runtime.numerics import configure_numerics
from engine.runtime.precision import PrecisionPlan
from engine.runtime.staging import InputStaging
from engine.runtime.tensorrt import BackendUnavailable
from engine.runtime.validation import validation_input

# What the tests and other tools read from this command's module.
__all__ = [
    "BackendUnavailable",
    "Golden",
    "InputStaging",
    "PrecisionPlan",
    "SharpConfig",
    "SharpOutput",
    "budget_refusal",
    "build_untrained",
    "evaluate_targets",
    "expected_seconds",
    "main",
]

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
DEFAULT_BUDGET_S = 450.0
DEFAULT_HARD_LIMIT_S = 480.0


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
        help="a golden case folder (tests/data/golden/cases/NAME): expected.npz and input.*",
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
    write_report(out, report, time.monotonic() - T0)
    if cuda_missing:
        report["state"] = "failed: CUDA is not available (use --smoke on a CPU)"
        write_report(out, report, time.monotonic() - T0)
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
                report["golden_error"] = first_line(error)
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
            write_report(out, report, time.monotonic() - T0)
            print(f"[{time.monotonic() - T0:6.1f} s] {name} ...", flush=True)
            rows[index] = run_backend(ctx, name, staging, golden)
            print_row(rows[index])
            write_report(out, report, time.monotonic() - T0)
            if name == REFERENCE and not ok(rows[index]):
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
        report["state"] = f"failed: {first_line(error)}"
        report["traceback"] = format_traceback(error)
        code = 2
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(out, report, time.monotonic() - T0)
    print()
    print((out / "gpu_check.md").read_text(), flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    if code in (3, 143):
        sys.stderr.flush()
        os._exit(code)  # compile workers may still be busy: do not wait for them at exit
    return code


if __name__ == "__main__":
    sys.exit(main())
