"""Network backends (TensorRT, torch.compile, eager), their validation, and the fallback chain.

Every backend runs the same network under one precision plan: float32 throughout, or the
top-level blocks in `BLOCKS` in float16/bfloat16 with explicit casts at their borders and
everything else (depth normalization, the composer) in float32. Explicit casts, not autocast,
give one set of numerics for all three backends: TensorRT builds the graph strongly typed
(it honours the dtypes it is given), and no weight is re-cast on every call.

A backend serves only after it has loaded and its outputs on a fixed synthetic input agree
with the eager float32 network within tolerance; otherwise the next one is tried and the
report says why. Backends that need minutes to compile run in a background thread while the
best quick one serves; a better one that passes replaces it atomically.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export.passes import move_to_device_pass

from engine.io.checkpoint import CheckpointInfo, cache_dir, file_digest
from engine.network import SharpNetwork, SharpOutput
from engine.splats.gaussians import covariances_from

logger = logging.getLogger(__name__)

NetworkFn = Callable[[torch.Tensor, torch.Tensor], SharpOutput]

BACKEND_ORDER = ("tensorrt", "compiled", "eager")  # fastest first
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# No CUDA graphs: at batch 1 this network's GPU time (tens of ms in ~1k large kernels) hides
# the launch overhead they would remove, while they pin a second copy of the outputs and
# their trees are per thread (we compile in a background thread, then serve from another).
# Autotuning lengthens the compile, which runs in the background and is cached on disk.
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"

_PREDICTOR = "monodepth_model.monodepth_predictor"
# The network's top-level blocks, in forward order: the units a precision plan puts in half
# precision or keeps in float32, and the rows of the per-block error report.
BLOCKS = (
    f"{_PREDICTOR}.encoder.patch_encoder",
    f"{_PREDICTOR}.encoder.image_encoder",
    f"{_PREDICTOR}.encoder.upsample_latent0",
    f"{_PREDICTOR}.encoder.upsample_latent1",
    f"{_PREDICTOR}.encoder.upsample0",
    f"{_PREDICTOR}.encoder.upsample1",
    f"{_PREDICTOR}.encoder.upsample2",
    f"{_PREDICTOR}.encoder.upsample_lowres",
    f"{_PREDICTOR}.encoder.fuse_lowres",
    f"{_PREDICTOR}.decoder",
    f"{_PREDICTOR}.head",
    "feature_model.decoder",
    "feature_model.image_encoder",
    "feature_model.fusion",
    "feature_model.texture_head",
    "feature_model.geometry_head",
    "prediction_head",
)
# Kept in float32 unless configured otherwise: the disparity head sets every depth, the delta
# head feeds exp/sigmoid activations; both are a small share of the FLOPs.
DEFAULT_FP32_BLOCKS = (f"{_PREDICTOR}.head", "prediction_head")
# A block stays in half precision when, alone, it uses at most this share of the tolerance.
BLOCK_BUDGET = 0.25

# The validation photo is square with focal length = width / 2: for it the metric Gaussians
# (engine.splats.gaussians.unproject scales by w / 2f and h / 2f) are exactly the network's output.
VALIDATION_DISPARITY_FACTOR = 0.5

ENGINE_FORMAT = 1  # bump when the saved engine's calling convention changes


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (library missing, no CUDA)."""


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSettings:
    backend: str = "auto"  # auto | tensorrt | compiled | eager
    precision: str | None = None  # fp32 | fp16 | bf16; None: fp16 on CUDA, fp32 on the CPU
    fp32_blocks: tuple[str, ...] = DEFAULT_FP32_BLOCKS
    compile_mode: str = DEFAULT_COMPILE_MODE
    engine_dir: Path | None = None  # None: <cache_dir()>/engines (the network volume if mounted)
    prebuilt_dir: Path | None = None  # read-only artifacts baked into the image at build time
    background: bool = True  # compile slow backends in a background thread

    def __post_init__(self) -> None:
        if self.backend not in ("auto", *BACKEND_ORDER):
            raise ValueError(
                f"backend must be auto, {', '.join(BACKEND_ORDER)}; got {self.backend!r}"
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        object.__setattr__(self, "fp32_blocks", tuple(resolve_block(b) for b in self.fp32_blocks))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> BackendSettings:
        """SHARP_BACKEND, SHARP_PRECISION, SHARP_FP32_BLOCKS (comma-separated), SHARP_COMPILE_MODE,
        SHARP_ENGINE_DIR, SHARP_PREBUILT_ENGINE_DIR; keyword overrides win where not None."""
        values: dict[str, Any] = {
            "backend": environ.get("SHARP_BACKEND", "auto").strip().lower() or "auto",
            "precision": environ.get("SHARP_PRECISION", "").strip().lower() or None,
            "compile_mode": environ.get("SHARP_COMPILE_MODE") or DEFAULT_COMPILE_MODE,
        }
        if "SHARP_FP32_BLOCKS" in environ:
            values["fp32_blocks"] = tuple(
                block.strip() for block in environ["SHARP_FP32_BLOCKS"].split(",") if block.strip()
            )
        for name, key in (
            ("engine_dir", "SHARP_ENGINE_DIR"),
            ("prebuilt_dir", "SHARP_PREBUILT_ENGINE_DIR"),
        ):
            if environ.get(key):
                values[name] = Path(environ[key]).expanduser()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_precision(self, device: torch.device) -> str:
        return self.precision or ("fp16" if device.type == "cuda" else "fp32")

    def engine_directory(self) -> Path:
        return self.engine_dir or cache_dir() / "engines"

    def artifact_dirs(self) -> list[Path]:
        """Where saved artifacts are looked up: the writable engine dir first."""
        return [self.engine_directory(), *([self.prebuilt_dir] if self.prebuilt_dir else [])]


def resolve_block(name: str) -> str:
    """A block's full name from itself or a unique dotted suffix ("patch_encoder")."""
    matches = [block for block in BLOCKS if block == name or block.endswith("." + name)]
    if len(matches) != 1:
        raise ValueError(f"{name!r} names {len(matches)} blocks; blocks are: {', '.join(BLOCKS)}")
    return matches[0]


# --- validation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    """The golden tolerances: max abs error for disparity, colors, opacities; means relative to
    the median depth; covariances relative to each Gaussian's largest |entry|."""

    disparity: float = 1e-4
    colors: float = 1e-4
    opacities: float = 1e-4
    means: float = 1e-4
    covariances: float = 1e-3

    def scaled(self, factor: float) -> Tolerances:
        return Tolerances(**{name: value * factor for name, value in asdict(self).items()})


GOLDEN_TOLERANCES = Tolerances()


def tolerances_for(precision: str) -> Tolerances:
    """Golden tolerances for float32 backends, ten times them for half precision."""
    return GOLDEN_TOLERANCES if precision == "fp32" else GOLDEN_TOLERANCES.scaled(10)


def validation_input(resolution: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic photo: smooth colour gradients, stripes and a bright disc, in [0, 1]."""
    coords = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    disc = (((x - 0.62) ** 2 + (y - 0.55) ** 2) < 0.03).double()
    red = 0.5 + 0.35 * torch.sin(6 * math.pi * x) * torch.cos(4 * math.pi * y)
    green = 0.2 + 0.6 * x * (1 - y) + 0.2 * disc
    blue = 0.8 - 0.6 * y + 0.1 * torch.sin(40 * math.pi * x)
    image = torch.stack([red, green, blue]).clamp(0, 1).float()[None].to(device)
    factor = torch.tensor([VALIDATION_DISPARITY_FACTOR], dtype=torch.float32, device=device)
    return image, factor


def reference_output(network: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> SharpOutput:
    """The eager float32 network's output: what every backend is held to."""
    with torch.inference_mode():
        return SharpOutput(*(t.float() for t in network(*inputs)))


def output_errors(reference: SharpOutput, candidate: SharpOutput) -> dict[str, float]:
    """Largest errors of the first image, in the units of `Tolerances`; inf where non-finite."""
    with torch.inference_mode():
        ref, cand = (SharpOutput(*(t[0].float() for t in out)) for out in (reference, candidate))
        for name, a, b in zip(SharpOutput._fields, ref, cand):
            if a.shape != b.shape:
                raise ValueError(f"{name}: shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        ref_cov = covariances_from(ref.quaternions, ref.scales).flatten(1)
        cand_cov = covariances_from(cand.quaternions, cand.scales).flatten(1)
        cov_error = (cand_cov - ref_cov).abs().amax(1) / (ref_cov.abs().amax(1) + 1e-12)
        errors = {
            "disparity": (cand.disparity - ref.disparity).abs().max(),
            "colors": (cand.colors - ref.colors).abs().max(),
            "opacities": (cand.opacities - ref.opacities).abs().max(),
            "means": (cand.means - ref.means).abs().max() / ref.means[:, 2].median(),
            "covariances": cov_error.max(),
        }
        return {name: _finite(float(value)) for name, value in errors.items()}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def exceeded(errors: Mapping[str, float], tolerances: Tolerances) -> list[str]:
    """'name error > tolerance' for each error over its tolerance."""
    limits = asdict(tolerances)
    return [f"{k} {v:.3g} > {limits[k]:.3g}" for k, v in errors.items() if not v <= limits[k]]


def error_ratio(errors: Mapping[str, float], tolerances: Tolerances) -> float:
    """The largest error as a share of its tolerance (1 = at the limit)."""
    limits = asdict(tolerances)
    return max(value / limits[name] for name, value in errors.items())


def json_errors(errors: Mapping[str, float]) -> dict[str, float | None]:
    """Errors for JSON: non-finite becomes null."""
    return {k: (v if math.isfinite(v) else None) for k, v in errors.items()}


# --- precision plans ----------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    fp32_blocks: tuple[str, ...] = ()  # of BLOCKS, kept in float32 (all of them for fp32)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def half_blocks(self) -> tuple[str, ...]:
        if self.precision == "fp32":
            return ()
        return tuple(block for block in BLOCKS if block not in self.fp32_blocks)

    def describe(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        kept = ", ".join(block.rsplit(".", 1)[-1] for block in self.fp32_blocks) or "none"
        return f"{self.precision} (fp32 blocks: {kept})"

    def identity(self) -> str:
        return self.precision + (
            "" if self.precision == "fp32" else ":" + ",".join(sorted(self.fp32_blocks))
        )


class CastBlock(nn.Module):
    """Runs a block in half precision: floating inputs cast in, outputs cast back to float32."""

    def __init__(self, block: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.block = block
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        args = pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.dtype), args)
        return pytree.tree_map_only(torch.Tensor, lambda t: t.float(), self.block(*args))


def mixed_network(network: nn.Module, plan: PrecisionPlan) -> nn.Module:
    """The network under `plan`, sharing its float32 weights outside the half-precision blocks.

    The original network is left unchanged: the modules on the path to each replaced block
    are shallow copies.
    """
    mixed = network
    for name in plan.half_blocks:
        with torch.no_grad():
            half = copy.deepcopy(network.get_submodule(name)).to(plan.dtype)
        mixed = _with_submodule(mixed, name, CastBlock(half, plan.dtype))
    return mixed


def _with_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    head, _, rest = path.partition(".")
    clone = copy.copy(root)
    clone.__dict__["_modules"] = dict(root._modules)
    clone._modules[head] = _with_submodule(root._modules[head], rest, new) if rest else new
    return clone


def measure_blocks(
    network: nn.Module,
    precision: str,
    inputs: tuple[torch.Tensor, torch.Tensor],
    reference: SharpOutput,
    blocks: Sequence[str] = BLOCKS,
) -> list[dict[str, Any]]:
    """Each block alone in `precision`, the rest in float32: the output errors it causes.

    Rows: block, ratio (largest error as a share of the half-precision tolerance), max_errors.
    """
    tolerances = tolerances_for(precision)
    rows = []
    for block in blocks:
        others = tuple(b for b in BLOCKS if b != block)
        candidate = mixed_network(network, PrecisionPlan(precision, others))
        with torch.inference_mode():
            errors = output_errors(reference, candidate(*inputs))
        ratio = error_ratio(errors, tolerances)
        logger.info("%s alone in %s: %.3g of the tolerance", block, precision, ratio)
        rows.append(
            {
                "block": block,
                "ratio": ratio if math.isfinite(ratio) else None,
                "max_errors": json_errors(errors),
            }
        )
    return rows


def blocks_over_budget(
    rows: Sequence[Mapping[str, Any]], budget: float = BLOCK_BUDGET
) -> tuple[str, ...]:
    """Blocks whose error alone exceeds `budget` of the tolerance (ratio None: non-finite)."""
    return tuple(row["block"] for row in rows if row["ratio"] is None or row["ratio"] > budget)


# --- export and artifact keys -------------------------------------------------------------


class TupleOutputs(nn.Module):
    """Returns the network's outputs as a plain tuple: tuples survive torch.export.save/load,
    ONNX and TensorRT without registering SharpOutput with pytree."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, image: torch.Tensor, disparity_factor: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return tuple(self.network(image, disparity_factor))


def export_network(
    network: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]
) -> torch.export.ExportedProgram:
    """torch.export of the network at the fixed shapes of `inputs`, outputs as a tuple."""
    with torch.no_grad():
        return torch.export.export(TupleOutputs(network).eval(), inputs, strict=False)


def network_from_program(program: torch.export.ExportedProgram) -> NetworkFn:
    module = program.module()
    return lambda image, disparity_factor: SharpOutput(*module(image, disparity_factor))


def checkpoint_digest(info: CheckpointInfo) -> str:
    """SHA-256 of the checkpoint file; for the built-in untrained model, of its configuration."""
    if info.path is not None:
        return file_digest(info.path)
    return "untrained-" + hashlib.sha256(repr(info.config).encode()).hexdigest()


# The modules whose code decides what the network computes: a change invalidates artifacts.
def network_source_digest() -> str:
    """A digest of the network package's source (placeholder until graph hashing)."""
    sha = hashlib.sha256()
    for path in sorted((Path(__file__).parents[1] / "network").glob("*.py")):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def runtime_versions() -> dict[str, str]:
    """torch, CUDA, cuDNN, torch-tensorrt and TensorRT versions ('' where absent)."""
    versions = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or ""),
    }
    for name, dist in (("torch_tensorrt", "torch-tensorrt"), ("tensorrt", "tensorrt")):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor'); engines run only where these match."""
    if device.type != "cuda":
        return "cpu", ""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass(frozen=True)
class EngineKey:
    """Everything a compiled TensorRT engine depends on; its digest names the cached file."""

    gpu: str
    capability: str
    versions: tuple[tuple[str, str], ...]
    checkpoint: str  # checkpoint digest
    source: str  # network_source_digest()
    plan: str  # PrecisionPlan.identity()
    resolution: int
    engine_format: int = ENGINE_FORMAT

    @classmethod
    def for_device(
        cls, device: torch.device, checkpoint: str, plan: PrecisionPlan, resolution: int
    ) -> EngineKey:
        gpu, capability = gpu_identity(device)
        versions = tuple(sorted(runtime_versions().items()))
        return cls(
            gpu,
            capability,
            versions,
            checkpoint,
            network_source_digest(),
            plan.identity(),
            resolution,
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    def filename(self) -> str:
        return f"sharp-trt-{self.digest()}.ep"


def program_filename(checkpoint: str, plan: PrecisionPlan, resolution: int) -> str:
    """Name of an exported program: it depends on weights, code, plan, shape and torch."""
    fields = [
        checkpoint,
        network_source_digest(),
        plan.identity(),
        str(resolution),
        torch.__version__,
    ]
    digest = hashlib.sha256("\n".join(fields).encode()).hexdigest()[:20]
    return f"sharp-{plan.precision}-{digest}.pt2"


def find_artifact(name: str, directories: Sequence[Path]) -> Path | None:
    return next((d / name for d in directories if (d / name).is_file()), None)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialises builds of one artifact across workers sharing a volume (best effort)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # some network filesystems have no locks
            logger.warning("Cannot lock %s; building without a lock", path)
        yield


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic JSON write: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(partial, path)


# --- TensorRT -----------------------------------------------------------------------------


def import_tensorrt() -> Any:
    try:
        import torch_tensorrt
    except ImportError as error:
        raise BackendUnavailable(
            f"torch_tensorrt is not installed ({error}); install torch-tensorrt matching torch "
            f"{torch.__version__.split('+')[0]}"
        ) from error
    return torch_tensorrt


def compile_tensorrt(
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, torch.Tensor],
    timing_cache: Path,
) -> torch.fx.GraphModule:
    """Compile an exported program with torch-tensorrt's dynamo frontend, strongly typed.

    The program already carries the precision plan's dtypes. torch-tensorrt >= 2.13 always
    builds strongly typed (and no longer has `enabled_precisions`); 2.9-2.12 need
    `use_explicit_typing=True` for it. TF32 is off so float32 layers stay IEEE float32, and
    half-precision matmuls accumulate in float32 as cuBLAS does for the eager network.
    """
    torch_tensorrt = import_tensorrt()
    half = any(
        getattr(node.meta.get("val"), "dtype", None) in (torch.float16, torch.bfloat16)
        for node in program.graph.nodes
    )
    options: dict[str, Any] = {
        "arg_inputs": list(inputs),
        "disable_tf32": True,
        "use_fp32_acc": half,
        "timing_cache_path": str(timing_cache),
    }
    if "use_explicit_typing" in inspect.signature(torch_tensorrt.dynamo.compile).parameters:
        options["use_explicit_typing"] = True
    return torch_tensorrt.dynamo.compile(program, **options)


def save_tensorrt(
    module: torch.fx.GraphModule, path: Path, inputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Save as an ExportedProgram with the engine embedded; atomic rename."""
    torch_tensorrt = import_tensorrt()
    partial = path.with_suffix(".partial" + path.suffix)
    # Protocol 4: the serialized engine holds all weights (over 1 GB for the official model).
    torch_tensorrt.save(
        module,
        str(partial),
        output_format="exported_program",
        arg_inputs=list(inputs),
        pickle_protocol=4,
    )
    os.replace(partial, path)


def load_tensorrt(path: Path) -> NetworkFn:
    """Load a saved engine; needs the same GPU architecture and TensorRT version (see EngineKey)."""
    torch_tensorrt = import_tensorrt()
    return network_from_program(torch_tensorrt.load(str(path)))


# --- backends -----------------------------------------------------------------------------


class BackendContext:
    """The network and everything backends share: validation input, reference output, plans.

    The reference output is computed once, when first needed, and dropped by `release`.
    """

    def __init__(
        self,
        network: SharpNetwork,
        device: torch.device,
        settings: BackendSettings,
        checkpoint: CheckpointInfo | str,
    ) -> None:
        self.network = network
        self.device = device
        self.settings = settings
        self._checkpoint = checkpoint
        self.resolution = network.config.internal_resolution
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference: SharpOutput | None = None
        self._plans: dict[str, PrecisionPlan] = {}
        self._block_errors: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        if device.type == "cuda":
            # fp32 means IEEE fp32 here: TF32 convolutions would miss the golden tolerances.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    @functools.cached_property
    def checkpoint(self) -> str:
        """The checkpoint digest, computed when a key first needs it (seconds for 2.8 GB)."""
        if isinstance(self._checkpoint, str):
            return self._checkpoint
        return checkpoint_digest(self._checkpoint)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._inputs is None:
                self._inputs = validation_input(self.resolution, self.device)
            return self._inputs

    def reference(self) -> SharpOutput:
        inputs = self.inputs()
        with self._lock:
            if self._reference is None:
                start = time.perf_counter()
                self._reference = reference_output(self.network, inputs)
                logger.info("Reference (eager fp32) output in %.1f s", time.perf_counter() - start)
            return self._reference

    def block_errors(self, precision: str) -> list[dict[str, Any]]:
        """`measure_blocks` for `precision`, measured once."""
        if precision not in self._block_errors:
            self._block_errors[precision] = measure_blocks(
                self.network, precision, self.inputs(), self.reference()
            )
        return self._block_errors[precision]

    def release(self) -> None:
        with self._lock:
            self._inputs = self._reference = None

    def plan(self, precision: str) -> PrecisionPlan:
        """The settings' plan, or one adjusted after a validation failure (saved on disk)."""
        with self._lock:
            if precision not in self._plans:
                plan = PrecisionPlan(
                    precision, self.settings.fp32_blocks if precision != "fp32" else ()
                )
                saved = find_artifact(self._plan_filename(plan), self.settings.artifact_dirs())
                if saved is not None:
                    plan = PrecisionPlan(
                        precision, tuple(json.loads(saved.read_text())["fp32_blocks"])
                    )
                    logger.info(
                        "Using the adjusted precision plan %s from %s", plan.describe(), saved
                    )
                self._plans[precision] = plan
            return self._plans[precision]

    def adjust_plan(
        self, plan: PrecisionPlan, rows: Sequence[Mapping[str, Any]]
    ) -> PrecisionPlan | None:
        """Keep the blocks over budget in float32 too; None when that changes nothing."""
        kept = tuple(b for b in BLOCKS if b in plan.fp32_blocks or b in blocks_over_budget(rows))
        if kept == tuple(b for b in BLOCKS if b in plan.fp32_blocks):
            return None
        adjusted = PrecisionPlan(plan.precision, kept)
        with self._lock:
            self._plans[plan.precision] = adjusted
        base = PrecisionPlan(plan.precision, self.settings.fp32_blocks)
        with contextlib.suppress(OSError):
            write_json(
                self.settings.engine_directory() / self._plan_filename(base),
                {"fp32_blocks": list(kept), "block_errors": list(rows)},
            )
        return adjusted

    def _plan_filename(self, base: PrecisionPlan) -> str:
        gpu, capability = gpu_identity(self.device)
        fields = [self.checkpoint, network_source_digest(), base.identity(), gpu, capability]
        return f"plan-{hashlib.sha256(chr(10).join(fields).encode()).hexdigest()[:20]}.json"


class Backend:
    """One way to run the network. `load` returns its forward or raises with the reason."""

    name = ""

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def quick(self, context: BackendContext) -> bool:
        """Whether `load` is fast (seconds): quick backends are tried before serving starts."""
        return True

    def load(self, context: BackendContext, plan: PrecisionPlan) -> NetworkFn:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}/{self.precision}"


class EagerBackend(Backend):
    name = "eager"

    def load(self, context: BackendContext, plan: PrecisionPlan) -> NetworkFn:
        return context.network if plan.precision == "fp32" else mixed_network(context.network, plan)


class CompiledBackend(Backend):
    """torch.compile (inductor) of the whole network as one graph, on CUDA."""

    name = "compiled"

    def quick(self, context: BackendContext) -> bool:
        return context.device.type != "cuda"  # refused at once on the CPU

    def load(self, context: BackendContext, plan: PrecisionPlan) -> NetworkFn:
        if context.device.type != "cuda":
            raise BackendUnavailable(
                "needs CUDA (on the CPU, compiling this network takes minutes for little gain)"
            )
        # Inductor's caches on the engine dir (the network volume when mounted) make later
        # cold starts reuse this compile.
        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", str(context.settings.engine_directory() / "inductor")
        )
        network = mixed_network(context.network, plan)
        return torch.compile(
            network, mode=context.settings.compile_mode, fullgraph=True, dynamic=False
        )


class TensorRTBackend(Backend):
    """A TensorRT engine from torch-tensorrt, loaded from the engine cache or compiled and saved."""

    name = "tensorrt"

    def quick(self, context: BackendContext) -> bool:
        try:
            import_tensorrt()
        except BackendUnavailable:
            return True  # refused at once
        if context.device.type != "cuda":
            return True
        return self.cached_engine(context, context.plan(self.precision)) is not None

    def engine_key(self, context: BackendContext, plan: PrecisionPlan) -> EngineKey:
        return EngineKey.for_device(context.device, context.checkpoint, plan, context.resolution)

    def cached_engine(self, context: BackendContext, plan: PrecisionPlan) -> Path | None:
        name = self.engine_key(context, plan).filename()
        return find_artifact(name, context.settings.artifact_dirs())

    def load(self, context: BackendContext, plan: PrecisionPlan) -> NetworkFn:
        import_tensorrt()
        if context.device.type != "cuda":
            raise BackendUnavailable("needs CUDA")
        cached = self.cached_engine(context, plan)
        if cached is None:
            key = self.engine_key(context, plan)
            target = context.settings.engine_directory() / key.filename()
            with file_lock(target.with_name(target.name + ".lock")):
                if not target.exists():  # another worker may have built it while we waited
                    build_tensorrt_engine(context, plan, key, target)
            cached = target
        logger.info("Loading TensorRT engine %s", cached)
        return load_tensorrt(cached)


def build_tensorrt_engine(
    context: BackendContext, plan: PrecisionPlan, key: EngineKey, target: Path
) -> dict[str, Any]:
    """Export (or load the exported program saved at image build), compile, save; returns the
    manifest written beside the engine. Validation is the caller's."""
    start = time.perf_counter()
    inputs = context.inputs()
    program_path = find_artifact(
        program_filename(context.checkpoint, plan, context.resolution),
        context.settings.artifact_dirs(),
    )
    if program_path is not None:
        logger.info("Compiling TensorRT engine (%s) from %s", plan.describe(), program_path)
        program = move_to_device_pass(torch.export.load(program_path), context.device)
    else:
        logger.info("Exporting the network (%s) for TensorRT", plan.describe())
        program = export_network(mixed_network(context.network, plan), inputs)
    module = compile_tensorrt(program, inputs, target.parent / "tensorrt-timing.cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_tensorrt(module, target, inputs)
    manifest = {
        "engine": target.name,
        "key": asdict(key),
        "precision": plan.precision,
        "fp32_blocks": list(plan.fp32_blocks),
        "exported_program": str(program_path) if program_path else None,
        "build_seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(target.with_suffix(".json"), manifest)
    logger.info("Built TensorRT engine %s in %.0f s", target, manifest["build_seconds"])
    return manifest


def make_backend(name: str, precision: str) -> Backend:
    classes = {"tensorrt": TensorRTBackend, "compiled": CompiledBackend, "eager": EagerBackend}
    return classes[name](precision)


def candidate_backends(settings: BackendSettings, device: torch.device) -> list[Backend]:
    """The requested backend and the slower ones after it, then eager fp32, the reference."""
    precision = settings.resolved_precision(device)
    first = 0 if settings.backend == "auto" else BACKEND_ORDER.index(settings.backend)
    candidates = [make_backend(name, precision) for name in BACKEND_ORDER[first:]]
    if precision != "fp32":
        candidates.append(EagerBackend("fp32"))
    return candidates


# --- the fallback chain -------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveBackend:
    name: str
    precision: str
    plan: PrecisionPlan
    forward: NetworkFn = field(repr=False)


class BackendRuntime:
    """Chooses the backend that serves, in order, and switches to a better one when a
    background compile passes. `active` is read once per request: a request in flight
    finishes on the backend it started with."""

    def __init__(self, context: BackendContext, candidates: Sequence[Backend]) -> None:
        if not candidates or not (
            candidates[-1].name == "eager" and candidates[-1].precision == "fp32"
        ):
            raise ValueError(
                "the last candidate must be eager fp32, the reference that always passes"
            )
        self.context = context
        self.candidates = list(candidates)
        self._lock = threading.Lock()
        self._active: ActiveBackend | None = None
        self._report: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> ActiveBackend:
        with self._lock:
            if self._active is None:
                raise RuntimeError("no backend is active: call start() first")
            return self._active

    @property
    def report(self) -> list[dict[str, Any]]:
        """One entry per backend tried: backend, precision, status, reason, max_errors, seconds."""
        with self._lock:
            return copy.deepcopy(self._report)

    def start(self, background: bool | None = None) -> ActiveBackend:
        """Try quick backends now; slow ones better than the chosen one go to a background thread
        (or run now when background is False)."""
        background = self.context.settings.background if background is None else background
        deferred: list[Backend] = []
        for backend in self.candidates:
            if background and not backend.quick(self.context):
                deferred.append(backend)
                self._add_entry(backend, "pending", "compiles in the background")
                continue
            if self._try(backend):
                break
        if deferred:
            active = self.active
            logger.info(
                "Serving with %s/%s while %s compile(s) in the background",
                active.name,
                active.precision,
                ", ".join(map(repr, deferred)),
            )
            self._thread = threading.Thread(
                target=self._run_deferred,
                args=(deferred,),
                name="sharp-backend-compile",
                daemon=True,
            )
            self._thread.start()
        else:
            self.context.release()
        return self.active

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background compile; True when none is running any more."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run_deferred(self, deferred: Sequence[Backend]) -> None:
        stream = (
            torch.cuda.Stream(self.context.device) if self.context.device.type == "cuda" else None
        )
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for index, backend in enumerate(deferred):
                if self._try(backend):
                    for rest in deferred[index + 1 :]:
                        self._update_entry(rest, "skipped", f"{backend!r} is serving")
                    break
        self.context.release()

    def _try(self, backend: Backend) -> bool:
        """Load and validate one backend; activate it when it passes. Never raises."""
        plan = self.context.plan(backend.precision)
        accepted, rows = self._attempt(backend, plan)
        if not accepted and rows and self.context.device.type == "cuda":
            adjusted = self.context.adjust_plan(plan, rows)
            if adjusted is not None:
                logger.info("Retrying %r with %s", backend, adjusted.describe())
                accepted, _ = self._attempt(backend, adjusted)
        return accepted

    def _attempt(self, backend: Backend, plan: PrecisionPlan) -> tuple[bool, list[dict[str, Any]]]:
        """(accepted, per-block error rows when refused for accuracy in half precision)."""
        start = time.perf_counter()
        self._add_entry(backend, "loading", "", plan=plan)
        try:
            forward = backend.load(self.context, plan)
        except Exception as error:  # noqa: BLE001 (any failure to load means: use the next one)
            self._refuse(backend, f"failed to load: {_describe(error)}", start)
            return False, []
        # Eager fp32 is the reference itself: nothing to validate, and no forward to wait for.
        is_reference = backend.name == "eager" and plan.precision == "fp32"
        errors: dict[str, float] = {}
        if not is_reference:
            try:
                with torch.inference_mode():
                    output = forward(*self.context.inputs())  # also the warm-up (and the compile)
                if self.context.device.type == "cuda":
                    torch.cuda.current_stream(self.context.device).synchronize()
                errors = output_errors(self.context.reference(), output)
                del output
            except Exception as error:  # noqa: BLE001 (a backend that cannot run is refused)
                self._refuse(backend, f"failed to run: {_describe(error)}", start)
                return False, []
        tolerances = tolerances_for(plan.precision)
        over = exceeded(errors, tolerances)
        if over:
            reason = "outputs differ from eager fp32 beyond tolerance: " + ", ".join(over)
            rows: list[dict[str, Any]] = []
            if plan.half_blocks and self.context.device.type == "cuda":
                rows = self.context.block_errors(plan.precision)
                offenders = ", ".join(blocks_over_budget(rows)) or "none"
                reason += f"; blocks over {BLOCK_BUDGET:.0%} of the tolerance alone: {offenders}"
            self._refuse(backend, reason, start, errors, rows)
            return False, rows
        seconds = round(time.perf_counter() - start, 2)
        with self._lock:
            previous = self._active
            self._active = ActiveBackend(backend.name, backend.precision, plan, forward)
            if previous is not None:
                self._set_status(
                    previous.name, previous.precision, "superseded", f"{backend!r} is faster"
                )
            entry = self._entry(backend)
            entry.update(
                status="active",
                reason="reference" if is_reference else "validated",
                max_errors=json_errors(errors) if errors else None,
                seconds=seconds,
                plan=plan.describe(),
            )
        logger.info(
            "%s %r (%s) after %.1f s%s",
            "Switched to" if previous else "Serving with",
            backend,
            plan.describe(),
            seconds,
            "" if is_reference else f"; max errors {_fmt(errors)}",
        )
        return True, []

    def _refuse(
        self,
        backend: Backend,
        reason: str,
        start: float,
        errors: Mapping[str, float] | None = None,
        rows: list[dict[str, Any]] | None = None,
    ) -> None:
        logger.warning("Refused %r: %s", backend, reason)
        with self._lock:
            entry = self._entry(backend)
            entry.update(
                status="refused", reason=reason, seconds=round(time.perf_counter() - start, 2)
            )
            if errors:
                entry["max_errors"] = json_errors(errors)
            if rows:
                entry["block_errors"] = rows

    def _add_entry(
        self, backend: Backend, status: str, reason: str, plan: PrecisionPlan | None = None
    ) -> None:
        with self._lock:
            entry = next(
                (
                    e
                    for e in self._report
                    if e["backend"] == backend.name
                    and e["precision"] == backend.precision
                    and e["status"] == "pending"
                ),
                None,
            )
            fields = {"status": status, "reason": reason, "max_errors": None, "seconds": None}
            if plan is not None:
                fields["plan"] = plan.describe()
            if entry is None:
                self._report.append(
                    {"backend": backend.name, "precision": backend.precision, **fields}
                )
            else:
                entry.update(fields)

    def _entry(self, backend: Backend) -> dict[str, Any]:
        return next(
            e
            for e in reversed(self._report)
            if e["backend"] == backend.name and e["precision"] == backend.precision
        )

    def _update_entry(self, backend: Backend, status: str, reason: str) -> None:
        with self._lock:
            self._entry(backend).update(status=status, reason=reason)

    def _set_status(self, name: str, precision: str, status: str, reason: str) -> None:
        for entry in reversed(self._report):
            if (
                entry["backend"] == name
                and entry["precision"] == precision
                and entry["status"] == "active"
            ):
                entry.update(status=status, reason=reason)
                return


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _fmt(errors: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
