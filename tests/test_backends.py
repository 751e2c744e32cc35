"""Backend choice, validation and the fallback chain; input staging; engine cache keys.

CPU tests use the tiny configuration (one forward is 5-15 s on 2 cores). Tests that need
CUDA or torch-tensorrt are skipped without them, with that reason.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine.io.checkpoint import TINY_UNTRAINED, build_untrained
from engine.network import SharpOutput
from engine.runtime.backends import (
    BLOCKS,
    DEFAULT_FP32_BLOCKS,
    Backend,
    BackendContext,
    BackendRuntime,
    BackendSettings,
    CastBlock,
    CompiledBackend,
    EagerBackend,
    EngineKey,
    PrecisionPlan,
    TensorRTBackend,
    blocks_over_budget,
    candidate_backends,
    mixed_network,
    output_errors,
    tolerances_for,
    validation_input,
)
from engine.runtime.predictor import SharpPredictor
from engine.runtime.staging import InputStaging, to_host

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
needs_tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TENSORRT), reason="needs CUDA and torch_tensorrt"
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def network():
    return build_untrained()


def settings(tmp_path, **overrides) -> BackendSettings:
    return BackendSettings(engine_dir=tmp_path / "engines", **{"background": False, **overrides})


class PerturbedBackend(Backend):
    """The real eager network with `delta` added to its colors: a backend that disagrees."""

    def __init__(self, name: str, precision: str, delta: float, quick: bool = True) -> None:
        super().__init__(precision)
        self.name = name
        self.delta = delta
        self.is_quick = quick
        self.loaded_in: list[str] = []

    def quick(self, context: BackendContext) -> bool:
        return self.is_quick

    def load(self, context, plan):
        self.loaded_in.append(threading.current_thread().name)

        def forward(image: torch.Tensor, disparity_factor: torch.Tensor) -> SharpOutput:
            output = context.network(image, disparity_factor)
            return output._replace(colors=output.colors + self.delta)

        return forward


class BrokenBackend(Backend):
    name = "broken"

    def load(self, context, plan):
        raise RuntimeError("engine file is corrupt")


# --- settings and plans -------------------------------------------------------------------


def test_settings_from_env_and_defaults():
    env = {
        "SHARP_BACKEND": "Compiled",
        "SHARP_PRECISION": "bf16",
        "SHARP_FP32_BLOCKS": "patch_encoder, prediction_head",
        "SHARP_COMPILE_MODE": "reduce-overhead",
        "SHARP_ENGINE_DIR": "/tmp/engines",
    }
    s = BackendSettings.from_env(env)
    assert (s.backend, s.precision, s.compile_mode) == ("compiled", "bf16", "reduce-overhead")
    assert s.fp32_blocks == (
        "monodepth_model.monodepth_predictor.encoder.patch_encoder",
        "prediction_head",
    )
    assert str(s.engine_directory()) == "/tmp/engines"
    assert BackendSettings.from_env(env, backend="eager").backend == "eager"

    default = BackendSettings.from_env({})
    assert default.backend == "auto" and default.fp32_blocks == DEFAULT_FP32_BLOCKS
    assert default.resolved_precision(CPU) == "fp32"
    assert default.resolved_precision(torch.device("cuda")) == "fp16"
    for bad in (
        {"SHARP_BACKEND": "onnx"},
        {"SHARP_PRECISION": "int8"},
        {"SHARP_FP32_BLOCKS": "image_encoder"},
    ):
        with pytest.raises(ValueError):  # image_encoder: ambiguous, two blocks end with it
            BackendSettings.from_env(bad)


def test_candidates_follow_the_order_and_end_with_eager_fp32():
    def names(s: BackendSettings, d: torch.device) -> list[str]:
        return [repr(b) for b in candidate_backends(s, d)]

    assert names(BackendSettings(), CPU) == ["tensorrt/fp32", "compiled/fp32", "eager/fp32"]
    assert names(BackendSettings(), torch.device("cuda")) == [
        "tensorrt/fp16",
        "compiled/fp16",
        "eager/fp16",
        "eager/fp32",
    ]
    assert names(BackendSettings(backend="compiled", precision="bf16"), CPU) == [
        "compiled/bf16",
        "eager/bf16",
        "eager/fp32",
    ]


def test_mixed_network_casts_only_the_plans_blocks_and_leaves_the_original(network):
    plan = PrecisionPlan("fp16", DEFAULT_FP32_BLOCKS)
    mixed = mixed_network(network, plan)
    assert set(plan.half_blocks) == set(BLOCKS) - set(DEFAULT_FP32_BLOCKS)
    for block in BLOCKS:
        module = mixed.get_submodule(block)
        original = network.get_submodule(block)
        assert isinstance(module, CastBlock) == (block in plan.half_blocks)
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == ({torch.float16} if block in plan.half_blocks else {torch.float32})
        assert not isinstance(original, CastBlock)
        assert {p.dtype for p in original.parameters()} == {torch.float32}
    # float32 weights are shared, not copied
    assert mixed.prediction_head is network.prediction_head
    assert mixed_network(network, PrecisionPlan("fp32")) is network


def test_cast_block_runs_in_half_and_returns_float32(network):
    head = network.prediction_head
    texture, geometry = torch.randn(2, 1, 32, 8, 8).unbind(0)
    block = CastBlock(copy.deepcopy(head).to(torch.bfloat16), torch.bfloat16)
    with torch.inference_mode():
        half, full = block(texture, geometry), head(texture, geometry)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)  # it really ran in bfloat16
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)


def test_blocks_over_budget_and_plan_adjustment(network, tmp_path):
    rows = [
        {"block": "prediction_head", "ratio": 3.0},
        {"block": BLOCKS[0], "ratio": 0.1},
        {"block": BLOCKS[1], "ratio": 0.3},
        {"block": BLOCKS[2], "ratio": None},  # non-finite errors
    ]
    assert blocks_over_budget(rows) == ("prediction_head", BLOCKS[1], BLOCKS[2])
    context = BackendContext(network, CPU, settings(tmp_path, precision="fp16"), "digest")
    plan = context.plan("fp16")
    adjusted = context.adjust_plan(plan, rows)
    assert set(adjusted.fp32_blocks) == set(DEFAULT_FP32_BLOCKS) | {BLOCKS[1], BLOCKS[2]}
    assert context.plan("fp16") == adjusted
    assert context.adjust_plan(adjusted, rows) is None  # nothing more to keep in fp32
    # a new worker (fresh context) picks the adjusted plan up from the engine dir
    fresh = BackendContext(network, CPU, settings(tmp_path, precision="fp16"), "digest")
    assert fresh.plan("fp16") == adjusted
    other = BackendContext(network, CPU, settings(tmp_path, precision="fp16"), "other-digest")
    assert other.plan("fp16") == plan


# --- validation ---------------------------------------------------------------------------


def test_output_errors_measure_each_quantity():
    n = 64
    generator = torch.Generator().manual_seed(0)
    means = torch.rand(1, n, 3, generator=generator) + torch.tensor([0.0, 0.0, 2.0])
    reference = SharpOutput(
        means=means,
        scales=torch.rand(1, n, 3, generator=generator) + 0.1,
        quaternions=torch.randn(1, n, 4, generator=generator),
        colors=torch.rand(1, n, 3, generator=generator),
        opacities=torch.rand(1, n, generator=generator),
        disparity=torch.rand(1, 2, 8, 8, generator=generator),
    )
    assert all(v == 0 for v in output_errors(reference, reference).values())
    depth = reference.means[0, :, 2].median()
    shifted = reference._replace(means=reference.means + 1e-3, opacities=reference.opacities - 2e-3)
    errors = output_errors(reference, shifted)
    assert errors["means"] == pytest.approx(1e-3 / float(depth), rel=1e-3)
    assert errors["opacities"] == pytest.approx(2e-3, rel=1e-3)
    assert errors["colors"] == 0 and errors["covariances"] == 0
    # the same rotation with the opposite sign is the same covariance
    flipped = reference._replace(quaternions=-reference.quaternions, scales=reference.scales * 1.01)
    assert output_errors(reference, flipped)["covariances"] == pytest.approx(0.0201, rel=0.05)
    nan = reference._replace(colors=reference.colors * float("nan"))
    assert output_errors(reference, nan)["colors"] == float("inf")
    assert tolerances_for("fp16").colors == pytest.approx(10 * tolerances_for("fp32").colors)


def test_validation_input_is_deterministic_and_in_range():
    image, factor = validation_input(1536, CPU)
    again, _ = validation_input(1536, CPU)
    assert image.shape == (1, 3, 1536, 1536) and torch.equal(image, again)
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.1
    assert factor.tolist() == [0.5]


# --- the fallback chain -------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="torch_tensorrt is installed here")
def test_refuses_backends_that_fail_to_load_and_uses_the_next(network, tmp_path):
    context = BackendContext(network, CPU, settings(tmp_path), TINY_UNTRAINED)
    candidates = [
        TensorRTBackend("fp32"),
        CompiledBackend("fp32"),
        BrokenBackend("fp32"),
        EagerBackend("fp32"),
    ]
    runtime = BackendRuntime(context, candidates)
    active = runtime.start()
    assert (active.name, active.precision) == ("eager", "fp32")
    report = runtime.report
    assert [(e["backend"], e["status"]) for e in report] == [
        ("tensorrt", "refused"),
        ("compiled", "refused"),
        ("broken", "refused"),
        ("eager", "active"),
    ]
    assert "torch_tensorrt is not installed" in report[0]["reason"]
    assert "needs CUDA" in report[1]["reason"]
    assert "engine file is corrupt" in report[2]["reason"]
    assert report[3]["reason"] == "reference"


def test_refuses_a_backend_that_disagrees_and_switches_after_a_background_compile(
    network, tmp_path
):
    """One chain, three forwards: a quick backend off by 5e-3 in colors is refused; a slow one
    (within tolerance) compiles in a background thread while eager fp32 serves, then replaces it."""
    context = BackendContext(network, CPU, settings(tmp_path, background=True), TINY_UNTRAINED)
    wrong = PerturbedBackend("wrong", "fp32", delta=5e-3)
    slow = PerturbedBackend("slow", "fp32", delta=2e-5, quick=False)
    runtime = BackendRuntime(context, [slow, wrong, EagerBackend("fp32")])
    active = runtime.start()

    assert (active.name, active.precision) == ("eager", "fp32")
    first = runtime.report
    assert first[0]["status"] in ("pending", "loading", "active")  # the background thread runs
    assert first[1]["status"] == "refused"
    assert "colors" in first[1]["reason"] and "beyond tolerance" in first[1]["reason"]
    assert first[1]["max_errors"]["colors"] == pytest.approx(5e-3, rel=1e-3)
    assert first[1]["max_errors"]["disparity"] == 0

    assert runtime.wait(timeout=300)
    assert runtime.active.name == "slow"
    assert slow.loaded_in == ["sharp-backend-compile"]
    final = {(e["backend"], e["status"]) for e in runtime.report}
    assert final == {("slow", "active"), ("wrong", "refused"), ("eager", "superseded")}
    accepted = next(e for e in runtime.report if e["status"] == "active")
    assert accepted["max_errors"]["colors"] == pytest.approx(2e-5, rel=1e-2)


def test_runtime_requires_the_reference_last(network, tmp_path):
    context = BackendContext(network, CPU, settings(tmp_path), TINY_UNTRAINED)
    with pytest.raises(ValueError):
        BackendRuntime(context, [EagerBackend("fp16")])


# --- cache keys ---------------------------------------------------------------------------


def test_engine_key_changes_with_gpu_versions_checkpoint_and_plan():
    versions = (("tensorrt", "10.13.0"), ("torch", "2.13.0"), ("torch_tensorrt", "2.13.0"))
    base = EngineKey("NVIDIA H100 80GB HBM3", "9.0", versions, "abc123", "src1", "fp16:x", 1536)
    changed = [
        dataclasses.replace(base, gpu="NVIDIA A100-SXM4-80GB"),
        dataclasses.replace(base, capability="8.0"),
        dataclasses.replace(base, versions=(("tensorrt", "10.14.1"), *versions[1:])),
        dataclasses.replace(base, versions=(*versions[:2], ("torch_tensorrt", "2.14.0"))),
        dataclasses.replace(base, versions=(versions[0], ("torch", "2.14.0"), versions[2])),
        dataclasses.replace(base, checkpoint="def456"),
        dataclasses.replace(base, source="src2"),
        dataclasses.replace(base, plan="fp32"),
    ]
    digests = {key.digest() for key in changed}
    assert base.digest() not in digests and len(digests) == len(changed)
    assert base.digest() == EngineKey(*dataclasses.astuple(base)).digest()
    assert base.filename().endswith(".ep")
    here = EngineKey.for_device(CPU, "abc123", PrecisionPlan("fp32"), 1536)
    assert here.gpu == "cpu" and dict(here.versions)["torch"] == torch.__version__


# --- staging and the predictor ------------------------------------------------------------


def test_staging_matches_the_plain_preprocess_and_grows_rarely(network):
    predictor = SharpPredictor(network, CPU, _tiny_info(network))
    staging = InputStaging(1536, CPU)
    rng = np.random.default_rng(0)
    capacities = []
    for height, width in ((300, 451), (1000, 750), (299, 449), (1024, 1024)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels, factor = staging.stage(rgb, 0.8)
        assert pixels is staging.network_input  # preallocated, reused
        assert torch.equal(pixels, predictor.preprocess(rgb))  # bit for bit
        assert factor.tolist() == [pytest.approx(0.8)]
        capacities.append(staging.capacity)
    assert capacities == [2**19, 2**22, 2**22, 2**22]  # grew once, by powers of two
    with pytest.raises(ValueError):
        staging.stage(np.zeros((4, 4, 4), np.uint8), 1.0)


def test_predictor_on_cpu_serves_eager_fp32_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARP_ENGINE_DIR", str(tmp_path))
    monkeypatch.delenv("SHARP_BACKEND", raising=False)
    monkeypatch.delenv("SHARP_PRECISION", raising=False)
    predictor = SharpPredictor.from_checkpoint(TINY_UNTRAINED, "cpu")
    assert (predictor.backend, predictor.precision) == ("eager", "fp32")
    report = predictor.backend_report
    assert [e["status"] for e in report] == ["refused", "refused", "active"]
    assert predictor.wait_for_backend(timeout=0)

    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, format="PNG")
    prediction = predictor.predict(buffer.getvalue(), focal_length_px=60.0)
    assert (prediction.backend, prediction.precision) == ("eager", "fp32")
    assert len(prediction.gaussians) == 2 * 768 * 768
    assert torch.isfinite(prediction.gaussians.means).all()
    assert set(prediction.timings_ms) == {"decode", "inference", "postprocess"}

    monkeypatch.setenv("SHARP_BACKEND", "eager")
    eager_only = SharpPredictor.from_checkpoint(TINY_UNTRAINED, "cpu")
    assert [e["backend"] for e in eager_only.backend_report] == ["eager"]


def _tiny_info(network):
    from engine.io.checkpoint import CheckpointInfo

    return CheckpointInfo(TINY_UNTRAINED, None, network.config, untrained=True)


# --- CUDA and TensorRT --------------------------------------------------------------------


@needs_cuda
def test_pinned_staging_and_host_copies_on_cuda():
    device = torch.device("cuda")
    network = build_untrained().to(device)
    predictor = SharpPredictor(network, device, _tiny_info(network))
    staging = InputStaging(1536, device)
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pixels, _ = staging.stage(rgb, 0.9)
        stream.synchronize()
    assert staging._host_bytes.is_pinned() and staging._host_factor.is_pinned()
    assert pixels.device.type == "cuda"
    torch.testing.assert_close(pixels, predictor.preprocess(rgb), rtol=0, atol=1e-6)
    gaussians = predictor.predict(_png(rgb)).gaussians
    host = to_host(gaussians)
    torch.cuda.synchronize()
    assert host.means.device.type == "cpu" and host.means.is_pinned()
    assert torch.equal(host.means, gaussians.means.cpu())
    on_host = predictor.predict(_png(rgb), to_host=True).gaussians
    assert on_host.colors.is_pinned()


@needs_cuda
def test_compiled_fp16_matches_eager_fp32_within_ten_times_golden(tiny_checkpoint, tmp_path):
    predictor = SharpPredictor.from_checkpoint(
        str(tiny_checkpoint),
        "cuda",
        settings=settings(tmp_path, backend="compiled", precision="fp16"),
    )
    report = predictor.backend_report
    assert (predictor.backend, predictor.precision) == ("compiled", "fp16"), report
    active = next(e for e in report if e["status"] == "active")
    limits = dataclasses.asdict(tolerances_for("fp16"))
    assert all(active["max_errors"][k] <= limits[k] for k in limits), active
    prediction = predictor.predict(_png(np.full((512, 512, 3), 90, np.uint8)))
    assert prediction.backend == "compiled" and prediction.gaussians.means.is_cuda


@needs_tensorrt
def test_tensorrt_engine_is_built_saved_loaded_and_validated(tiny_checkpoint, tmp_path):
    options = settings(tmp_path, backend="tensorrt", precision="fp16")
    first = SharpPredictor.from_checkpoint(str(tiny_checkpoint), "cuda", settings=options)
    assert first.backend == "tensorrt", first.backend_report
    engines = list((tmp_path / "engines").glob("sharp-trt-*.ep"))
    assert len(engines) == 1 and engines[0].with_suffix(".json").is_file()

    # a second worker loads the cached engine quickly and validates it again
    context = BackendContext(
        first.network, torch.device("cuda"), options, first.runtime.context.checkpoint
    )
    backend = TensorRTBackend("fp16")
    assert backend.quick(context)
    runtime = BackendRuntime(context, [backend, EagerBackend("fp32")])
    assert runtime.start().name == "tensorrt"
    entry = runtime.report[0]
    assert entry["status"] == "active" and entry["seconds"] < 120


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
