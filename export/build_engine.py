"""Build SHARP's engine artifacts: the exported program (and ONNX), and on a GPU a TensorRT engine.

    python export/build_engine.py [--checkpoint SPEC] [--output-dir DIR] [--onnx]

Everywhere: exports the network at its fixed input (1x3x1536x1536 image, (1,) disparity
factor) with torch.export under the precision plan the worker will use, and saves it (.pt2)
with a manifest. On a CUDA GPU with torch-tensorrt: measures each block's half-precision
error, compiles a TensorRT engine, validates it against the eager float32 network, and saves
it where the worker finds it (keyed by GPU, versions and checkpoint). Where Apple's `sharp`
package is importable, also checks parity with it on the real weights.

A Docker image build has no GPU and may have no checkpoint: then this saves what it can,
says so, and exits 0; the worker exports and compiles on its first start.
Exit codes: 0 built (or deferred to the worker), 1 a validation or parity check failed,
2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.io.checkpoint import (
    DEFAULT_CHECKPOINT_URL,
    TINY_UNTRAINED,
    CheckpointError,
    cache_dir,
    load_network,
    resolve_checkpoint,
)
from engine.network import SharpOutput
from engine.runtime.backends import (
    DEFAULT_FP32_BLOCKS,
    PRECISIONS,
    BackendContext,
    BackendRuntime,
    BackendSettings,
    BackendUnavailable,
    EagerBackend,
    PrecisionPlan,
    TensorRTBackend,
    exceeded,
    export_network,
    gpu_identity,
    import_tensorrt,
    json_errors,
    mixed_network,
    network_from_program,
    output_errors,
    program_filename,
    runtime_versions,
    tolerances_for,
    validation_input,
    write_json,
)
from engine.runtime.predictor import resolve_device

logger = logging.getLogger("sharp-runpod.build-engine")

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "sharp.onnx"
NO_GPU_MESSAGE = "no GPU: saved exported program; the worker compiles on first start"


@dataclass(frozen=True)
class BuildOptions:
    checkpoint: str | None = None  # None: SHARP_CHECKPOINT, else Apple's published checkpoint
    output_dir: Path | None = None  # None: <cache_dir()>/engines
    precision: str = "fp16"  # the precision the worker will serve in on the GPU
    fp32_blocks: tuple[str, ...] = DEFAULT_FP32_BLOCKS
    onnx: bool = False
    device: str = "auto"
    validate: bool | None = None  # check the exported program; None: on a GPU only
    apple_parity: str = "auto"  # auto (GPU, `sharp` importable, real checkpoint) | off | require
    require_checkpoint: bool = False  # fail instead of deferring when it cannot be had


@dataclass(frozen=True)
class BuildManifest:
    status: str  # engine | exported | deferred | failed
    message: str
    checkpoint: str
    checkpoint_digest: str | None = None
    precision: str = ""
    fp32_blocks: tuple[str, ...] = ()
    device: str = ""
    gpu: str | None = None
    capability: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    exported_program: str | None = None
    onnx: str | None = None
    engine: str | None = None
    engine_key: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None  # name -> {max_errors, tolerances, passed}
    block_errors: list[dict[str, Any]] | None = None
    backend_report: list[dict[str, Any]] | None = None
    apple_parity: dict[str, Any] | None = None
    build_seconds: float = 0.0
    created: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def build_engine(options: BuildOptions = BuildOptions()) -> BuildManifest:
    """Build what this machine can and write the manifest (see the module docstring)."""
    start = time.perf_counter()
    spec = options.checkpoint or os.environ.get("SHARP_CHECKPOINT") or DEFAULT_CHECKPOINT_URL
    output_dir = options.output_dir or cache_dir() / "engines"
    output_dir.mkdir(parents=True, exist_ok=True)

    def finish(status: str, message: str, **fields: Any) -> BuildManifest:
        manifest = BuildManifest(
            status=status,
            message=message,
            checkpoint=spec,
            precision=options.precision,
            versions=runtime_versions(),
            build_seconds=round(time.perf_counter() - start, 1),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
        )
        write_json(output_dir / MANIFEST_NAME, asdict(manifest))
        (logger.error if status == "failed" else logger.info)("%s", message)
        return manifest

    if spec != TINY_UNTRAINED:
        try:
            resolve_checkpoint(spec)  # downloads into the cache when it is a URL
        except CheckpointError as error:
            if options.require_checkpoint:
                raise
            return finish(
                "deferred",
                f"checkpoint unavailable at build time ({error}); the worker loads it, exports "
                "and compiles on first start",
            )
    network, info = load_network(spec)
    device = resolve_device(options.device)
    validate = device.type == "cuda" if options.validate is None else options.validate
    fields: dict[str, Any] = {"device": str(device)}
    validation: dict[str, Any] = {}
    if options.onnx:  # from the float32 network on the CPU, before it moves to the device
        onnx_path = output_dir / ONNX_NAME
        export_onnx(
            network,
            validation_input(network.config.internal_resolution, torch.device("cpu")),
            onnx_path,
        )
        fields["onnx"] = onnx_path.name
    network = network.to(device)
    settings = BackendSettings(
        backend="tensorrt",
        precision=options.precision,
        fp32_blocks=options.fp32_blocks,
        engine_dir=output_dir,
        background=False,
    )
    context = BackendContext(network, device, settings, info)
    gpu, capability = gpu_identity(device)
    fields.update(
        checkpoint_digest=context.checkpoint,
        gpu=gpu if device.type == "cuda" else None,
        capability=capability or None,
    )
    reports: list[dict[str, Any]] = []
    if device.type == "cuda" and options.precision != "fp32":
        # Measure each block in half precision; the eager check keeps in float32 the blocks
        # that lose accuracy (the plan saved here is the one the worker and TensorRT use).
        fields["block_errors"] = context.block_errors(options.precision)
        eager = BackendRuntime(context, [EagerBackend(options.precision), EagerBackend("fp32")])
        eager.start(background=False)
        reports += eager.report
    plan = context.plan(options.precision)
    fields["fp32_blocks"] = plan.fp32_blocks

    inputs = context.inputs()
    logger.info("Exporting the network (%s) at its fixed input", plan.describe())
    program_path = output_dir / program_filename(context.checkpoint, plan, context.resolution)
    save_program(export_network(mixed_network(network, plan), inputs), program_path)
    fields["exported_program"] = program_path.name
    if validate:  # what was saved, loaded back: the round trip the worker relies on
        loaded = network_from_program(torch.export.load(program_path))
        validation["exported_program"] = _check(loaded(*inputs), context, plan.precision)
        if options.onnx:
            validation["onnx"] = _check(run_onnx(output_dir / ONNX_NAME, inputs), context, "fp32")
    if validation:
        fields["validation"] = validation
    failed = [name for name, result in validation.items() if not result["passed"]]

    message = NO_GPU_MESSAGE
    if device.type == "cuda":
        message, engine_fields = _build_tensorrt(context, plan)
        reports += engine_fields.pop("backend_report", [])
        engine_validation = engine_fields.pop("engine_validation", None)
        if engine_validation is not None:
            validation["tensorrt"] = engine_validation
            fields["validation"] = validation
            if not engine_validation["passed"]:
                failed.append("tensorrt")
        fields.update(engine_fields)
    if reports:
        fields["backend_report"] = reports

    parity = _apple_parity(options, info.path, network, device)
    if parity is not None:
        fields["apple_parity"] = parity
        if not parity["passed"]:
            failed.append("apple_parity")
    if failed:
        return finish("failed", f"checks failed: {', '.join(failed)}", **fields)
    status = "engine" if fields.get("engine") else "exported"
    return finish(status, message, **fields)


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save with an atomic rename, so a reader never sees half a file."""
    partial = path.with_suffix(".partial.pt2")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, partial)
    os.replace(partial, path)
    logger.info("Saved exported program %s", path)


def export_onnx(
    network: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], path: Path
) -> None:
    """ONNX of the float32 network with its weights as external data (the official model is
    2.8 GB, over protobuf's 2 GB limit). Float32: the portable form; precision is the
    consumer's choice."""
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
    logger.info("Saved ONNX %s (+ %s.data)", path, path.name)


def _check(output: Any, context: BackendContext, precision: str) -> dict[str, Any]:
    tolerances = tolerances_for(precision)
    errors = output_errors(context.reference(), output)
    over = exceeded(errors, tolerances)
    return {
        "passed": not over,
        "max_errors": json_errors(errors),
        "tolerances": asdict(tolerances),
        "exceeded": over,
    }


def run_onnx(path: Path, inputs: Sequence[torch.Tensor]) -> SharpOutput:
    """Run an exported ONNX graph in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": inputs[0].cpu().numpy(), "disparity_factor": inputs[1].cpu().numpy()}
    outputs = session.run(None, feeds)
    return SharpOutput(*(torch.from_numpy(array).to(inputs[0].device) for array in outputs))


def _build_tensorrt(context: BackendContext, plan: PrecisionPlan) -> tuple[str, dict[str, Any]]:
    """The worker's own TensorRT path: load or compile, validate against eager fp32, save."""
    try:
        import_tensorrt()
    except BackendUnavailable as error:
        return f"{error}: saved exported program; the worker compiles on first start", {}
    backend = TensorRTBackend(plan.precision)
    runtime = BackendRuntime(context, [backend, EagerBackend("fp32")])
    active = runtime.start(background=False)
    report = runtime.report
    attempts = [e for e in report if e["backend"] == "tensorrt"]
    fields: dict[str, Any] = {
        "backend_report": report,
        "engine_validation": {
            "passed": active.name == "tensorrt",
            "max_errors": attempts[-1]["max_errors"],
            "tolerances": asdict(tolerances_for(plan.precision)),
            "reason": attempts[-1]["reason"],
        },
    }
    if active.name != "tensorrt":
        return "TensorRT engine refused (see backend_report)", fields
    engine = backend.cached_engine(context, active.plan)
    fields.update(
        engine=engine.name if engine else None,
        engine_key=asdict(backend.engine_key(context, active.plan)),
        fp32_blocks=active.plan.fp32_blocks,
    )
    return f"TensorRT engine {engine} ({active.plan.describe()}) validated", fields


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
    return compare_with_apple(network, checkpoint, device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=f"local .pt, http(s) URL, hf://owner/repo[/file] or '{TINY_UNTRAINED}' "
        f"(default: $SHARP_CHECKPOINT, else {DEFAULT_CHECKPOINT_URL})",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: <cache dir>/engines"
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default=os.environ.get("SHARP_PRECISION") or "fp16",
        help="precision the worker serves in on the GPU (default: $SHARP_PRECISION or fp16)",
    )
    parser.add_argument(
        "--fp32-blocks",
        default=os.environ.get("SHARP_FP32_BLOCKS", ",".join(DEFAULT_FP32_BLOCKS)),
        help="comma-separated blocks kept in float32 in fp16/bf16 (default: $SHARP_FP32_BLOCKS)",
    )
    parser.add_argument("--onnx", action="store_true", help="also export ONNX (external data)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the exported program (and ONNX) against eager fp32 (default: on a GPU only)",
    )
    parser.add_argument("--apple-parity", choices=["auto", "off", "require"], default="auto")
    parser.add_argument(
        "--require-checkpoint",
        action="store_true",
        help="fail when the checkpoint cannot be had (default: defer to the worker, exit 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        options = BuildOptions(
            checkpoint=args.checkpoint,
            output_dir=args.output_dir,
            precision=args.precision,
            fp32_blocks=tuple(b.strip() for b in args.fp32_blocks.split(",") if b.strip()),
            onnx=args.onnx,
            device=args.device,
            validate=args.validate,
            apple_parity=args.apple_parity,
            require_checkpoint=args.require_checkpoint,
        )
        manifest = build_engine(options)
    except (CheckpointError, ValueError, RuntimeError) as error:
        logger.error("%s", error)
        return 2
    print(manifest.message)
    return 0 if manifest.ok else 1


if __name__ == "__main__":
    sys.exit(main())
