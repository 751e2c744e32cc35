"""Build one serving artifact for SHARP: export, compile, validate, save under its key.

    python export/build_engine.py [--checkpoint SPEC] [--backend auto|tensorrt|compiled|exported]
        [--precision fp16] [--output-dir DIR] [--measure-blocks] [--onnx]

The worker runs this as a child process when its engine is missing (engine.runtime.builds);
the image build and `sharp-runpod build-engine` run it by hand. Steps: load the checkpoint,
export the network under the precision plan with torch.export, compile it (TensorRT or
AOTInductor on a GPU; `exported` saves the program itself), save it atomically under the
artifact key (engine.runtime.artifacts) while holding the build lock, load it back the way the
worker does and validate it against eager float32, and write a manifest beside it.

`auto` builds what a worker on this machine would serve: TensorRT or AOTInductor on a GPU.
Without a GPU (a Docker image build) there is nothing a GPU worker could use, so it says so and
exits 0; likewise when the checkpoint cannot be had at build time.
Exit codes: 0 built, present or nothing to do; 1 the build or its validation failed; 2 bad
arguments or an unusable checkpoint; 3 another live build holds the lock.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.io.checkpoint import TINY_UNTRAINED, CheckpointError, load_network, resolve_checkpoint
from engine.network import SharpOutput
from engine.runtime.artifacts import (
    ArtifactKey,
    BuildLock,
    LockHeld,
    checkpoint_digest,
    graph_digest,
    runtime_versions,
    set_aside,
)
from engine.runtime.backends import (
    BACKENDS,
    BuildContext,
    artifact_backend,
    export_network,
    preferred_kind,
)
from engine.runtime.builds import EXIT_LOCK_HELD
from engine.runtime.device import resolve_device
from engine.runtime.files import write_json
from engine.runtime.numerics import configure_numerics
from engine.runtime.precision import PrecisionPlan, mixed_network
from engine.runtime.validation import (
    measure_blocks,
    reference_output,
    validate,
    validation_input,
)
from engine.settings import DEFAULT_CHECKPOINT_URL, EngineSettings, Settings, SettingsError

logger = logging.getLogger("sharp-runpod.build-engine")

ONNX_NAME = "sharp.onnx"
KINDS = ("auto", *BACKENDS)


@dataclass(frozen=True)
class BuildOptions:
    checkpoint: str | None = None  # None: SHARP_CHECKPOINT, else Apple's published checkpoint
    output_dir: Path | None = None  # None: the worker's engine dir
    backend: str = "auto"
    precision: str | None = None  # None: what the worker serves (fp16 on CUDA, fp32 on CPU)
    fp32_blocks: tuple[str, ...] | None = None  # None: SHARP_FP32_BLOCKS or the default set
    device: str = "auto"
    measure_blocks: bool = False  # each block's half-precision error, into the manifest
    onnx: bool = False
    apple_parity: str = "auto"  # auto (GPU, `sharp` importable, real checkpoint) | off | require
    require_checkpoint: bool = False  # fail instead of deferring when it cannot be had
    expect_key: str | None = None  # the digest the launching worker computed


@dataclass(frozen=True)
class BuildResult:
    status: str  # built | present | skipped | deferred | failed | locked
    message: str
    manifest: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return {"failed": 1, "locked": EXIT_LOCK_HELD}.get(self.status, 0)


def build_engine(options: BuildOptions, settings: EngineSettings) -> BuildResult:
    start = time.perf_counter()
    spec = options.checkpoint or settings.checkpoint or DEFAULT_CHECKPOINT_URL
    output_dir = options.output_dir or settings.engine_directory
    device = resolve_device(options.device)
    kind = options.backend if options.backend != "auto" else preferred_kind("auto", device)
    if kind is None:
        return BuildResult(
            "skipped",
            "no GPU: nothing a GPU worker could load; it builds its engine at first start",
        )
    if options.expect_key:  # a worker's child: skip loading anything when another build runs
        early = _locked_or_present(kind, options, output_dir)
        if early is not None:
            return early
    if spec != TINY_UNTRAINED:
        try:
            resolve_checkpoint(spec, settings.cache_dir)  # downloads into the cache for a URL
        except CheckpointError as error:
            if options.require_checkpoint:
                raise
            return BuildResult(
                "deferred", f"checkpoint unavailable ({error}); the worker builds at first start"
            )
    network, info = load_network(spec, cache_dir=settings.cache_dir)
    network = network.to(device)
    plan = PrecisionPlan.for_precision(
        options.precision or settings.resolved_precision(device.type),
        options.fp32_blocks if options.fp32_blocks is not None else settings.fp32_blocks,
    )
    resolution = network.config.internal_resolution
    key = ArtifactKey.create(kind, device, checkpoint_digest(info), plan, resolution)
    if options.expect_key and options.expect_key != key.digest():
        return BuildResult(
            "failed",
            f"artifact key {key.digest()} is not the worker's {options.expect_key}: versions differ between the two processes",
        )
    target = output_dir / key.filename
    if target.is_file():
        return BuildResult("present", f"{target} exists")
    lock = BuildLock(output_dir / (key.filename + ".lock"))
    try:
        lock.acquire()
    except LockHeld as error:
        return BuildResult("locked", str(error))
    try:
        if target.is_file():  # built by another process while we loaded the checkpoint
            return BuildResult("present", f"{target} exists")
        manifest = _build(kind, network, plan, key, target, device, options, settings)
    except Exception as error:
        logger.exception("Build of %s failed", target.name)
        return BuildResult("failed", f"{kind} build failed: {type(error).__name__}: {error}"[:800])
    finally:
        lock.release()
    manifest.update(build_seconds=round(time.perf_counter() - start, 1), checkpoint=spec)
    parity = _apple_parity(options, info.path, network, device)
    if parity is not None:
        manifest["apple_parity"] = parity
    if options.onnx:  # last: it moves the network to the CPU
        manifest["onnx"] = export_onnx(network.cpu(), output_dir / ONNX_NAME)
    write_json(output_dir / key.manifest_name, manifest)
    if not manifest["validation"]["passed"] or (parity is not None and not parity["passed"]):
        return BuildResult(
            "failed",
            f"{target.name} failed validation: {manifest['validation']['exceeded'] or 'Apple parity'}",
            manifest,
        )
    return BuildResult(
        "built",
        f"built and validated {target} ({plan.describe()}) in {manifest['build_seconds']} s",
        manifest,
    )


def _locked_or_present(kind: str, options: BuildOptions, output_dir: Path) -> BuildResult | None:
    """From the worker's key alone: the artifact is there already, or a live build holds it."""
    precision = options.precision or "fp32"
    name = ArtifactKey.filename_for(kind, precision, options.expect_key)
    if (output_dir / name).is_file():
        return BuildResult("present", f"{output_dir / name} exists")
    owner = BuildLock(output_dir / (name + ".lock")).owner()
    if owner is not None:
        return BuildResult("locked", f"{name} is being built by {owner}")
    return None


def _build(
    kind: str,
    network: torch.nn.Module,
    plan: PrecisionPlan,
    key: ArtifactKey,
    target: Path,
    device: torch.device,
    options: BuildOptions,
    settings: EngineSettings,
) -> dict[str, Any]:
    """Export, compile and save under the lock; then load back and validate what was saved."""
    inputs = validation_input(network.config.internal_resolution, device)
    reference = reference_output(network, inputs)
    manifest: dict[str, Any] = {"key": key.to_json(), "plan": plan.describe(), "kind": kind}
    if options.measure_blocks and plan.half_blocks:
        manifest["block_errors"] = measure_blocks(network, plan.precision, inputs, reference)
    logger.info("Exporting the network (%s) at its fixed input", plan.describe())
    program = export_network(mixed_network(network, plan), inputs)
    manifest["graph"] = graph_digest(program)
    logger.info("Building the %s artifact %s", kind, target.name)
    backend = artifact_backend(kind)
    context = BuildContext(
        inputs, device, runtime_versions()["tensorrt"], workspace_gb=settings.trt_workspace_gb
    )
    backend.build(program, target, context)
    forward = backend.load(target, device)  # exactly what the worker will load
    with torch.inference_mode():
        verdict = validate(reference, SharpOutput(*forward(*inputs)), plan.precision)
    manifest["validation"] = verdict.to_json()
    if not verdict.passed:
        set_aside(target, f"failed validation: {verdict.describe()}")
    return manifest


def export_onnx(network: torch.nn.Module, path: Path) -> str:
    """ONNX of the float32 network with external weights (the official model is over
    protobuf's 2 GB limit). Float32: the portable form; precision is the consumer's choice."""
    inputs = validation_input(network.config.internal_resolution, torch.device("cpu"))
    logger.info("Exporting ONNX (fp32); this takes a minute")
    onnx_program = torch.onnx.export(
        export_network(network, inputs),
        inputs,
        dynamo=True,
        input_names=["image", "disparity_factor"],
        output_names=list(SharpOutput._fields),
        external_data=True,
    )
    onnx_program.save(str(path), external_data=True)
    return path.name


def run_onnx(path: Path, inputs: Sequence[torch.Tensor]) -> SharpOutput:
    """Run an exported ONNX graph in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": inputs[0].cpu().numpy(), "disparity_factor": inputs[1].cpu().numpy()}
    outputs = session.run(None, feeds)
    return SharpOutput(*(torch.from_numpy(array).to(inputs[0].device) for array in outputs))


def _apple_parity(
    options: BuildOptions, checkpoint: Path | None, network: torch.nn.Module, device: torch.device
) -> dict[str, Any] | None:
    from export.apple_parity import apple_available, compare_with_apple

    if options.apple_parity == "off":
        return None
    reasons = []
    if not apple_available():
        reasons.append("Apple's sharp package is not importable")
    if checkpoint is None:
        reasons.append("no checkpoint file (the untrained model has no Apple counterpart)")
    if options.apple_parity == "auto" and device.type != "cuda":
        reasons.append(
            "no GPU (two full forwards take minutes on a CPU; --apple-parity require runs it)"
        )
    if reasons:
        if options.apple_parity == "require":
            return {"passed": False, "skipped": "; ".join(reasons)}
        logger.info("Skipping parity with Apple's sharp: %s", "; ".join(reasons))
        return None
    return compare_with_apple(network.float(), checkpoint, device)


def _exit_with_parent() -> None:
    """A worker's build must not outlive it: its lock then goes stale and the next one rebuilds."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        logger.error("The worker that started this build is gone; stopping")
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=f"local .pt, http(s) URL, hf://owner/repo[/file] or '{TINY_UNTRAINED}' (default: $SHARP_CHECKPOINT, else Apple's)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: $SHARP_ENGINE_DIR, else <cache dir>/engines",
    )
    parser.add_argument("--backend", choices=KINDS, default="auto")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="default: $SHARP_PRECISION, else fp16 on a GPU and fp32 on the CPU",
    )
    parser.add_argument(
        "--fp32-blocks",
        default=None,
        help="comma-separated blocks kept in fp32 in half precision (default: $SHARP_FP32_BLOCKS, else the disparity and prediction heads)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--measure-blocks",
        action="store_true",
        help="measure each block's half-precision error into the manifest",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also export ONNX (fp32, external data)"
    )
    parser.add_argument("--apple-parity", choices=["auto", "off", "require"], default="auto")
    parser.add_argument(
        "--require-checkpoint",
        action="store_true",
        help="fail when the checkpoint cannot be had (default: defer to the worker, exit 0)",
    )
    parser.add_argument("--expect-key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # a child of a serving worker yields the CPU to its requests
    if args.exit_with_parent:
        _exit_with_parent()
    try:
        settings = Settings.from_env().engine
        blocks = (
            None
            if args.fp32_blocks is None
            else tuple(b.strip() for b in args.fp32_blocks.split(",") if b.strip())
        )
        options = BuildOptions(
            checkpoint=args.checkpoint,
            output_dir=args.output_dir,
            backend=args.backend,
            precision=args.precision,
            fp32_blocks=blocks,
            device=args.device,
            measure_blocks=args.measure_blocks,
            onnx=args.onnx,
            apple_parity=args.apple_parity,
            require_checkpoint=args.require_checkpoint,
            expect_key=args.expect_key,
        )
        configure_numerics()
        result = build_engine(options, settings)
    except (SettingsError, CheckpointError, ValueError, RuntimeError) as error:
        logger.error("%s", error)
        return 2
    (logger.error if result.status == "failed" else logger.info)("%s", result.message)
    print(f"{result.status}: {result.message}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
