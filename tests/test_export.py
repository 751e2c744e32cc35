"""The build tool (export/build_engine.py) as the image build and a user run it, and ONNX.

The build-in-a-child path the worker takes is in test_runtime.py; here the tool runs as a
script, the way the Dockerfile and `sharp-runpod build-engine` call it.
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
from engine.runtime.backends import artifact_backend, export_network
from engine.runtime.precision import DEFAULT_FP32_BLOCKS, PrecisionPlan, mixed_network
from engine.runtime.validation import reference_output, validation_input
from export.apple_parity import apple_available, compare_with_apple
from export.build_engine import ONNX_NAME, export_onnx, run_onnx

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CLI = str(Path(sys.executable).with_name("sharp-runpod"))
needs_gpu_build = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt")),
    reason="needs CUDA and torch_tensorrt",
)


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARP_")}
    return subprocess.run(
        command, cwd=REPO, env={**clean, "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return validation_input(1536, CPU)


@pytest.fixture(scope="module")
def eager(inputs) -> SharpOutput:
    return reference_output(build_untrained(), inputs)


def assert_outputs_close(actual: SharpOutput, expected: SharpOutput, atol: float) -> None:
    for name, a, e in zip(SharpOutput._fields, actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_image_build_without_a_gpu_exits_0_and_says_why(tmp_path):
    """The Dockerfile's call on a builder without a GPU: nothing a GPU worker could load."""
    result = run([sys.executable, "export/build_engine.py", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("skipped: no GPU") and not any(tmp_path.iterdir())


def test_build_engine_command_builds_validates_and_writes_a_manifest(tmp_path, inputs, eager):
    result = run(
        [CLI, "build-engine", "--checkpoint", TINY_UNTRAINED, "--backend", "exported",
         "--device", "cpu", "--output-dir", str(tmp_path)]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("built: built and validated")
    (artifact,) = tmp_path.glob("sharp-exported-fp32-*.pt2")
    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert manifest["validation"]["passed"] and manifest["key"]["kind"] == "exported"
    assert manifest["key"]["versions"]["torch"] == torch.__version__ and manifest["graph"]
    with torch.inference_mode():
        assert_outputs_close(
            artifact_backend("exported").load(artifact, CPU)(*inputs), eager, atol=1e-5
        )
    again = run([CLI, "build-engine", "--checkpoint", TINY_UNTRAINED, "--backend", "exported",
                 "--device", "cpu", "--output-dir", str(tmp_path)])  # fmt: skip
    assert again.returncode == 0 and again.stdout.startswith("present:")


def test_a_key_the_worker_did_not_compute_is_refused(tmp_path):
    result = run(
        [sys.executable, "-m", "export.build_engine", "--checkpoint", TINY_UNTRAINED,
         "--backend", "exported", "--device", "cpu", "--output-dir", str(tmp_path),
         "--precision", "fp32", "--expect-key", "0" * 20]
    )  # fmt: skip
    assert result.returncode == 1 and "is not the worker's" in result.stdout
    assert not list(tmp_path.glob("*.pt2"))


def test_the_half_precision_plan_is_in_the_exported_graph(inputs):
    plan = PrecisionPlan.for_precision("fp16")
    program = export_network(mixed_network(build_untrained(), plan), inputs)
    dtypes = {
        node.meta["val"].dtype
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor)
    }
    assert {torch.float16, torch.float32} <= dtypes and plan.fp32_blocks == DEFAULT_FP32_BLOCKS
    outputs = next(node for node in program.graph.nodes if node.op == "output").args[0]
    assert {o.meta["val"].dtype for o in outputs} == {torch.float32}


def test_onnx_round_trips_in_onnxruntime(tmp_path, inputs, eager):
    path = tmp_path / ONNX_NAME
    export_onnx(build_untrained(), path)
    # weights are external data: the graph file itself stays small
    assert path.stat().st_size < 5e6 < (tmp_path / f"{ONNX_NAME}.data").stat().st_size
    assert_outputs_close(run_onnx(path, inputs), eager, atol=1e-4)


def test_build_defers_when_the_checkpoint_cannot_be_had(tmp_path):
    missing = str(tmp_path / "absent" / "sharp.pt")
    base = [sys.executable, "-m", "export.build_engine", "--checkpoint", missing,
            "--backend", "exported", "--device", "cpu", "--output-dir", str(tmp_path)]  # fmt: skip
    result = run(base)
    assert result.returncode == 0 and result.stdout.startswith("deferred: checkpoint unavailable")
    assert run([*base, "--require-checkpoint"]).returncode == 2


def test_build_fails_on_a_broken_checkpoint(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = run([sys.executable, "-m", "export.build_engine", "--checkpoint", str(broken),
                  "--backend", "exported", "--device", "cpu", "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr


@needs_gpu_build
def test_gpu_build_compiles_validates_and_measures_blocks(tiny_checkpoint, tmp_path):
    result = run(
        [CLI, "build-engine", "--checkpoint", str(tiny_checkpoint), "--backend", "tensorrt",
         "--precision", "fp16", "--output-dir", str(tmp_path), "--measure-blocks"],
        CUDA_VISIBLE_DEVICES="0",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    (manifest_path,) = tmp_path.glob("sharp-tensorrt-fp16-*.ep.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["validation"]["passed"] and manifest["key"]["gpu"] != "cpu"
    blocks = {row["block"] for row in manifest["block_errors"]}
    assert blocks >= set(PrecisionPlan.for_precision("fp16").half_blocks)


@pytest.mark.slow
@pytest.mark.skipif(not apple_available(), reason="needs Apple's sharp package")
def test_parity_with_apples_package_on_official_shapes(official_checkpoint):
    """Two official-size forwards on the CPU (minutes): this network against Apple's."""
    network, _ = load_network(str(official_checkpoint))
    result = compare_with_apple(network, official_checkpoint, CPU)
    assert result["passed"], result
