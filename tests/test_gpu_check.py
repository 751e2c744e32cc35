"""benchmarks/gpu_check.py: the CPU smoke run end to end, in an environment reduced to what
the GPU machine has (torch, numpy, Pillow), and its golden comparison, targets and budget."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# Runs the script as `python benchmarks/gpu_check.py ARGS` would, with every installed
# top-level module (one in site-packages) outside the allowed ones not found, as if it were
# not installed: find_spec returns None for it. The standard library stays importable.
BLOCKER = r"""
import os, runpy, site, sys, sysconfig
allowed = set(sys.argv[1].split(","))
installed = tuple(
    os.path.realpath(p) + os.sep
    for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
)

class Bare:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self.finder, "find_spec", None)
        spec = find(name, path, target) if find else None
        if spec is None or path is not None or name in allowed:
            return spec
        places = [spec.origin or "", *(spec.submodule_search_locations or [])]
        if any(os.path.realpath(p).startswith(installed) for p in places if p):
            return None
        return spec

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Bare(finder) for finder in sys.meta_path]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def bare_modules() -> list[str]:
    """Top-level modules of torch (and what it requires), numpy and Pillow, and the project's."""
    dists, todo = set(), ["torch", "numpy", "pillow"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in dists:
            continue
        dists.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r)[0] for r in requirements if "extra ==" not in r]
    modules = {
        top
        for top, owners in importlib.metadata.packages_distributions().items()
        if any(owner.lower().replace("_", "-") in dists for owner in owners)
    }
    return sorted(modules | {"engine", "torch", "numpy", "PIL"})


def run_bare(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(bare_modules()), str(SCRIPT), *args],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


# bfloat16 is emulated on CPUs without AVX-512 BF16: a tiny bf16 forward takes minutes there
# instead of seconds, so the smoke run gets room for both bf16 backends.
SMOKE_BUDGET_S = 1200


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    limits = ("--budget-s", str(SMOKE_BUDGET_S), "--hard-limit-s", str(SMOKE_BUDGET_S + 100))
    result = run_bare("--smoke", "--inject-failure", *limits, "--out", str(out), timeout=1500)
    return result, out


@pytest.mark.timeout(1800)
def test_smoke_run_reports_every_backend(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["state"] == "complete"
    assert report["smoke"] and report["config"] == "tiny"
    assert report["environment"]["versions"]["torch"] == torch.__version__
    rows = {row["backend"]: row for row in report["backends"]}
    assert list(rows) == ["eager-fp32", "eager-bf16", "export-bf16", "broken-fp32"]
    for name in ("eager-fp32", "eager-bf16", "export-bf16"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["forward_ms"] > 0 and row["build_s"] >= 0
        validation = row["validation"]
        assert set(validation["max_errors"]) == {
            "disparity",
            "colors",
            "opacities",
            "means",
            "covariances",
        }
        assert all(v is None or v >= 0 for v in validation["max_errors"].values())
        assert validation["precision"] == name.split("-")[1]
        assert isinstance(validation["passed"], bool)
    # The reference against itself: run to run on the CPU, bit for bit.
    assert rows["eager-fp32"]["validation"]["passed"]
    assert max(rows["eager-fp32"]["validation"]["max_errors"].values()) == 0
    # An export of the bf16 plan computes what the eager bf16 plan computes.
    assert rows["export-bf16"]["validation"]["max_errors"] == pytest.approx(
        rows["eager-bf16"]["validation"]["max_errors"], rel=0.05, abs=1e-6
    )

    request = rows["eager-fp32"]["request"]
    assert request["ply_ms"] > request["to_gaussians_ms"] > request["decode_ms"] > 0
    assert request["ply_bytes"] > 56 * report["num_gaussians"]
    if request["sog_ms"] is None:
        assert request["sog_unavailable"]
    else:
        assert request["sog_ms"] > request["to_gaussians_ms"] and request["sog_bytes"] > 0

    broken = rows["broken-fp32"]
    assert broken["status"] == "failed" and "injected failure" in broken["reason"]
    assert "Traceback" in broken["traceback"]

    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 4
    assert all("met" in t for t in targets.values())


@pytest.mark.timeout(1800)
def test_smoke_markdown_has_a_row_per_backend(smoke):
    result, out = smoke
    table = (out / "gpu_check.md").read_text()
    assert table in result.stdout  # printed as well
    for name in ("eager-fp32", "eager-bf16", "export-bf16"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "ok"
        assert float(cells[3]) > 0  # forward ms
        assert cells[8].startswith(("pass", "FAIL"))  # validation
    assert "| broken-fp32 | failed: RuntimeError: injected failure" in table
    assert "| target | value | backend | met |" in table


def test_hard_limit_stops_the_run_and_leaves_its_results(tmp_path):
    result = run_bare(
        "--smoke",
        "--backends",
        "eager-fp32",
        "--hard-limit-s",
        "10",
        "--out",
        str(tmp_path),
        timeout=120,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["state"] == "stopped: hard time limit"
    assert report["backends"][0]["status"] == "timeout"
    assert "| eager-fp32 | timeout" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_backend_is_refused():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--backends", "eager-fp64"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "eager-fp64" in result.stderr


def test_budget(gpu_check):
    assert gpu_check.budget_refusal(100, 120, 450) is None
    assert "budget" in gpu_check.budget_refusal(400, 120, 450)
    assert "budget" in gpu_check.budget_refusal(451, 0, 450)
    rows = [
        {"backend": "eager-fp32", "kind": "eager", "seconds": 10},
        {"backend": "compile-fp16", "kind": "compile", "seconds": 150},
        {"backend": "eager-fp16", "kind": "eager", "seconds": 4},
        {"backend": "compile-bf16", "kind": "compile", "status": "pending"},
    ]
    assert gpu_check.expected_seconds("aoti", rows) == 150
    assert gpu_check.expected_seconds("eager", rows) == 10
    assert gpu_check.expected_seconds("compile", rows[:1]) == 0


def _row(backend, forward_ms, passed=True, sog_ms=None, ratio=0.5):
    kind, precision = backend.split("-")
    check = {"passed": passed, "ratio": ratio, "exceeded": [] if passed else ["x"]}
    return {
        "backend": backend,
        "kind": kind,
        "status": "ok",
        "forward_ms": forward_ms,
        "validation": {**check, "precision": precision},
        "request": {"sog_ms": sog_ms},
    }


def test_targets(gpu_check):
    rows = [
        _row("eager-fp32", 300.0, sog_ms=400.0, ratio=0.0),
        _row("eager-fp16", 120.0, sog_ms=220.0),
        _row("compile-fp16", 50.0, sog_ms=140.0),
        _row("aoti-fp16", 30.0, passed=False, sog_ms=100.0, ratio=3.0),  # fast but wrong
        {"backend": "tensorrt-fp16", "kind": "tensorrt", "status": "skipped", "reason": "absent"},
    ]
    forward, speedup, request, accuracy = gpu_check.evaluate_targets(rows, golden=False)
    assert (forward["value"], forward["backend"], forward["met"]) == (50.0, "compile-fp16", True)
    assert (speedup["value"], speedup["met"]) == (6.0, True)
    assert (request["value"], request["backend"], request["met"]) == (140.0, "compile-fp16", True)
    assert (accuracy["met"], accuracy["backend"], accuracy["value"]) == (False, "aoti-fp16", 3.0)

    rows[2] = _row("compile-fp16", 110.0, sog_ms=200.0)
    forward, speedup, request, _ = gpu_check.evaluate_targets(rows, golden=False)
    assert forward["met"] is False and speedup["met"] is False and speedup["value"] == 2.73
    assert request["met"] is False and request["value"] == 200.0

    forward, _, _, accuracy = gpu_check.evaluate_targets(rows[:1], golden=False)
    assert forward["met"] is None and accuracy["met"] is None
    # Compiled, but in float32 only: the half-precision targets were not measured.
    forward, *_ = gpu_check.evaluate_targets([rows[0], _row("compile-fp32", 100.0)], False)
    assert forward["met"] is None and "ran" in forward["note"]
    # A compiled half-precision backend that fails validation misses the target.
    failed = _row("compile-fp16", 20.0, passed=False)
    forward, *_ = gpu_check.evaluate_targets([rows[0], failed], golden=False)
    assert forward["met"] is False and "passed validation" in forward["note"]


def test_golden_check_passes_the_reference_and_catches_an_error(gpu_check, golden_dir, tmp_path):
    """The golden comparison the GPU run makes, here with the tiny case on the CPU."""
    case = golden_dir / "cases" / "tiny_astronaut"
    for source in (case / "expected.npz", case / "input.png"):
        shutil.copy(source, tmp_path)
    golden = gpu_check.Golden.load(tmp_path)
    network = gpu_check.build_untrained(gpu_check.SharpConfig.tiny())
    network.load_state_dict(golden.make_weights(network.state_dict()))
    staging = gpu_check.InputStaging(network.config.internal_resolution, torch.device("cpu"))
    outputs = []

    def forward(image, disparity_factor):
        if not outputs:
            outputs.append(network(image, disparity_factor))
        return outputs[0]

    verdict = golden.check(forward, staging, "fp32")
    assert verdict.passed, verdict.describe()
    assert 0 < verdict.max_errors["disparity"] < 1e-4

    def off(image, disparity_factor):  # opacities 5e-4 off: within 10x (bf16), not 1x (fp32)
        output = forward(image, disparity_factor)
        return output._replace(opacities=output.opacities + 5e-4)

    verdict = golden.check(off, staging, "fp32")
    assert not verdict.passed and [e.split()[0] for e in verdict.exceeded] == ["opacities"]
    assert golden.check(off, staging, "bf16").passed


def test_golden_folder_must_be_complete(gpu_check, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected.npz"):
        gpu_check.Golden.load(tmp_path)


def test_artifact_backends_are_the_engines_built_saved_and_loaded(gpu_check, tmp_path):
    """export-* builds the engine's exported artifact, saves it and loads it back, as the
    worker would; aoti-* on the CPU is skipped before anything is compiled."""
    from benchmarks.gpu_harness import builders

    class Toy(torch.nn.Module):  # the network's calling convention, six outputs
        def forward(self, image, disparity_factor):
            flat = image.flatten(2).transpose(1, 2)[:, :, :3]
            return gpu_check.SharpOutput(
                flat, flat.abs() + 0.1, torch.cat([flat, flat[..., :1]], -1),
                flat.sigmoid(), flat[..., 0].sigmoid(), image[:, :2] * disparity_factor[:, None, None, None],
            )  # fmt: skip

    inputs = (torch.rand(1, 3, 8, 8), torch.tensor([0.5]))
    args = argparse.Namespace(trt_workspace_gb=1.0, compile_mode="default")
    ctx = builders.Context(Toy(), torch.device("cpu"), inputs, args, tmp_path, b"")
    plan = gpu_check.PrecisionPlan("fp32")
    forward, info = builders.build("export", ctx, plan)
    assert info["file_mb"] >= 0 and set(info) >= {"export_s", "compile_s", "load_s"}
    for got, want in zip(forward(*inputs), Toy()(*inputs)):
        assert torch.equal(got, want)
    assert list(tmp_path.iterdir()) == []  # the artifact is removed after loading
    with pytest.raises(gpu_check.BackendUnavailable, match="CUDA"):
        builders.build("aoti", ctx, plan)
