"""Export of the tiny configuration: torch.export and ONNX round trips, and the build script.

Tolerances against the eager float32 network on the fixed validation input: the exported
program, saved and loaded back, within 1e-5 absolute per output (torch.export replays the
same ATen kernels, so it is exact in practice); the ONNX graph in onnxruntime within the
golden 1e-4 absolute (different kernels, float32 rounding only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.io.checkpoint import TINY_UNTRAINED, build_untrained, load_network
from engine.network import SharpOutput
from engine.runtime.backends import (
    DEFAULT_FP32_BLOCKS,
    PrecisionPlan,
    network_from_program,
    program_filename,
    reference_output,
    validation_input,
)
from export.apple_parity import apple_available, compare_with_apple
from export.build_engine import (
    MANIFEST_NAME,
    NO_GPU_MESSAGE,
    ONNX_NAME,
    BuildOptions,
    build_engine,
    main,
    run_onnx,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
needs_gpu_build = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt")),
    reason="needs CUDA and torch_tensorrt",
)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return validation_input(1536, CPU)


@pytest.fixture(scope="module")
def eager(inputs) -> SharpOutput:
    return reference_output(build_untrained(), inputs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("artifacts")
    options = BuildOptions(
        checkpoint=TINY_UNTRAINED,
        output_dir=output_dir,
        precision="fp32",
        onnx=True,
        device="cpu",
        validate=False,
        apple_parity="off",
    )
    return build_engine(options), output_dir


def assert_outputs_close(actual: SharpOutput, expected: SharpOutput, atol: float) -> None:
    for name, a, e in zip(SharpOutput._fields, actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_manifest_of_a_cpu_build(built):
    manifest, output_dir = built
    assert manifest.status == "exported" and manifest.message == NO_GPU_MESSAGE
    on_disk = json.loads((output_dir / MANIFEST_NAME).read_text())
    assert on_disk["status"] == "exported" and on_disk["precision"] == "fp32"
    assert on_disk["exported_program"] == program_filename(
        manifest.checkpoint_digest, PrecisionPlan("fp32"), 1536
    )
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["gpu"] is None and on_disk["engine"] is None


def test_exported_program_round_trips(built, inputs, eager):
    manifest, output_dir = built
    program = torch.export.load(output_dir / manifest.exported_program)
    with torch.inference_mode():
        output = network_from_program(program)(*inputs)
    assert_outputs_close(output, eager, atol=1e-5)


def test_onnx_round_trips_in_onnxruntime(built, inputs, eager):
    manifest, output_dir = built
    path = output_dir / ONNX_NAME
    assert manifest.onnx == ONNX_NAME
    # weights are external data: the graph file itself stays small
    assert path.stat().st_size < 5e6 < (output_dir / f"{ONNX_NAME}.data").stat().st_size
    assert_outputs_close(run_onnx(path, inputs), eager, atol=1e-4)


def test_build_script_without_gpu_saves_the_program_and_a_manifest(tmp_path):
    """The Docker build's call: no GPU, default precision (fp16 plan), exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("SHARP_PRECISION", "SHARP_FP32_BLOCKS")}
    result = subprocess.run(
        [
            sys.executable,
            "export/build_engine.py",
            "--checkpoint",
            TINY_UNTRAINED,
            "--output-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert NO_GPU_MESSAGE in result.stdout
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["status"] == "exported" and manifest["precision"] == "fp16"
    assert manifest["fp32_blocks"] == list(DEFAULT_FP32_BLOCKS)
    program = torch.export.load(tmp_path / manifest["exported_program"])
    dtypes = {
        node.meta["val"].dtype
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor)
    }
    assert {torch.float16, torch.float32} <= dtypes  # the plan's casts are in the graph
    outputs = next(node for node in program.graph.nodes if node.op == "output").args[0]
    assert {o.meta["val"].dtype for o in outputs} == {torch.float32}


def test_build_defers_when_the_checkpoint_cannot_be_had(tmp_path, capsys):
    missing = str(tmp_path / "absent" / "sharp.pt")
    assert main(["--checkpoint", missing, "--output-dir", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["status"] == "deferred" and "first start" in manifest["message"]
    assert "unavailable" in capsys.readouterr().out
    assert (
        main(["--checkpoint", missing, "--output-dir", str(tmp_path), "--require-checkpoint"]) == 2
    )


def test_build_fails_on_a_broken_checkpoint(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(broken), "--output-dir", str(tmp_path)]) == 2


@needs_gpu_build
def test_gpu_build_compiles_validates_and_reports_blocks(tiny_checkpoint, tmp_path):
    manifest = build_engine(
        BuildOptions(checkpoint=str(tiny_checkpoint), output_dir=tmp_path, precision="fp16")
    )
    assert manifest.status == "engine", manifest
    assert (tmp_path / manifest.engine).is_file()
    assert manifest.validation["exported_program"]["passed"]
    assert manifest.gpu and manifest.capability and manifest.versions["torch_tensorrt"]
    assert {row["block"] for row in manifest.block_errors} >= set(PrecisionPlan("fp16").half_blocks)
    assert manifest.validation["tensorrt"]["passed"]
    assert any(
        e["backend"] == "tensorrt" and e["status"] == "active" for e in manifest.backend_report
    )


@pytest.mark.slow
@pytest.mark.skipif(not apple_available(), reason="needs Apple's sharp package")
def test_parity_with_apples_package_on_official_shapes(official_checkpoint):
    """Two official-size forwards on the CPU (minutes): this network against Apple's."""
    network, _ = load_network(str(official_checkpoint))
    result = compare_with_apple(network, official_checkpoint, CPU)
    assert result["passed"], result
