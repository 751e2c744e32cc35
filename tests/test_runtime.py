"""The runtime: precision plans, validation, artifact keys and locks, and the build-switch path.

Everything runs on the CPU with the tiny configuration: the artifact there is the exported
program (`SHARP_BACKEND=exported`), built by the real build tool in a real child process, so
the path a GPU worker takes to TensorRT is the one tested here, less the compiler.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from handler_support import SAMPLE, worker_server

from engine.io.checkpoint import TINY_UNTRAINED, build_untrained, load_network
from engine.io.images import decode_image
from engine.network import SharpOutput, TupleOutputs
from engine.runtime.artifacts import (
    ArtifactKey,
    BuildLock,
    LockHeld,
    checkpoint_digest,
    set_aside,
)
from engine.runtime.backends import BACKENDS, artifact_backend, export_network
from engine.runtime.files import write_atomic
from engine.runtime.graph_code import graph_code_digest, graph_modules
from engine.runtime.precision import (
    BLOCKS,
    DEFAULT_FP32_BLOCKS,
    CastBlock,
    PrecisionPlan,
    mixed_network,
)
from engine.runtime.predictor import SharpPredictor
from engine.runtime.serving import NetworkRuntime
from engine.runtime.validation import (
    output_errors,
    reference_output,
    tolerances_for,
    validate,
    validation_input,
)
from engine.settings import BACKENDS as SETTINGS_BACKENDS
from engine.settings import EngineSettings
from engine.splats.formats import encode
from export.build_engine import BuildOptions, build_engine

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
FP32 = PrecisionPlan("fp32")


@pytest.fixture(scope="module")
def network():
    return build_untrained()


@pytest.fixture(scope="module")
def info():
    return load_network(TINY_UNTRAINED)[1]


@pytest.fixture(scope="module")
def inputs():
    return validation_input(1536, CPU)


@pytest.fixture(scope="module")
def reference(network, inputs) -> SharpOutput:
    return reference_output(network, inputs)


def engine_settings(engine_dir: Path, **overrides) -> EngineSettings:
    values = dict(
        checkpoint=TINY_UNTRAINED, device="cpu", backend="exported", engine_dir=engine_dir
    )
    return EngineSettings(**{**values, **overrides})


def key_for(info) -> ArtifactKey:
    return ArtifactKey.create("exported", CPU, checkpoint_digest(info), FP32, 1536)


@pytest.fixture(scope="module")
def built_artifact(tmp_path_factory) -> Path:
    """One exported artifact, built by the build tool in this process, reused by the tests."""
    engine_dir = tmp_path_factory.mktemp("built")
    result = build_engine(
        BuildOptions(
            checkpoint=TINY_UNTRAINED, backend="exported", device="cpu", apple_parity="off"
        ),
        engine_settings(engine_dir),
    )
    assert result.status == "built", result.message
    assert result.manifest["validation"]["passed"] and result.manifest["graph"]
    return next(engine_dir.glob("sharp-exported-fp32-*.pt2"))


# --- precision plans and validation --------------------------------------------------------


def test_mixed_network_casts_only_the_plans_blocks_and_leaves_the_original(network):
    plan = PrecisionPlan.for_precision("fp16")
    assert plan.fp32_blocks == DEFAULT_FP32_BLOCKS
    mixed = mixed_network(network, plan)
    for block in BLOCKS:
        module, original = mixed.get_submodule(block), network.get_submodule(block)
        assert isinstance(module, CastBlock) == (block in plan.half_blocks)
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == ({torch.float16} if block in plan.half_blocks else {torch.float32})
        assert {p.dtype for p in original.parameters()} == {torch.float32}
    assert mixed.prediction_head is network.prediction_head  # float32 weights are shared
    assert mixed_network(network, FP32) is network
    with pytest.raises(ValueError, match="fp8"):
        PrecisionPlan.for_precision("fp8")


def test_cast_block_runs_in_half_and_returns_float32(network):
    head = network.prediction_head
    texture, geometry = torch.randn(2, 1, 32, 8, 8).unbind(0)
    block = CastBlock(copy.deepcopy(head).to(torch.bfloat16), torch.bfloat16)
    with torch.inference_mode():
        half, full = block(texture, geometry), head(texture, geometry)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)


def test_validation_measures_each_quantity_and_judges():
    n, generator = 64, torch.Generator().manual_seed(0)
    reference = SharpOutput(
        means=torch.rand(1, n, 3, generator=generator) + torch.tensor([0.0, 0.0, 2.0]),
        scales=torch.rand(1, n, 3, generator=generator) + 0.1,
        quaternions=torch.randn(1, n, 4, generator=generator),
        colors=torch.rand(1, n, 3, generator=generator),
        opacities=torch.rand(1, n, generator=generator),
        disparity=torch.rand(1, 2, 8, 8, generator=generator),
    )
    assert all(v == 0 for v in output_errors(reference, reference).values())
    depth = float(reference.means[0, :, 2].median())
    shifted = reference._replace(means=reference.means + 1e-3, opacities=reference.opacities - 2e-3)
    errors = output_errors(reference, shifted)
    assert errors["means"] == pytest.approx(1e-3 / depth, rel=1e-3)
    assert errors["opacities"] == pytest.approx(2e-3, rel=1e-3) and errors["colors"] == 0
    flipped = reference._replace(quaternions=-reference.quaternions)  # the same covariance
    assert output_errors(reference, flipped)["covariances"] < 1e-6
    assert not validate(reference, shifted, "fp32").passed  # 2e-3 > 1e-4
    assert validate(reference, shifted, "fp16").exceeded == ("opacities 0.002 > 0.001",)
    nan = reference._replace(colors=reference.colors * float("nan"))
    assert output_errors(reference, nan)["colors"] == float("inf")
    assert tolerances_for("bf16").colors == pytest.approx(10 * tolerances_for("fp32").colors)


# --- artifact keys, locks and files ---------------------------------------------------------


def test_artifact_key_names_everything_the_artifact_depends_on(info):
    key = key_for(info)
    variants = [
        dataclasses.replace(key, kind="tensorrt"),
        dataclasses.replace(key, gpu="NVIDIA H100 80GB HBM3", capability="9.0"),
        dataclasses.replace(key, versions=(("torch", "2.11.0"),)),
        dataclasses.replace(key, checkpoint="other"),
        dataclasses.replace(key, code="other"),
        dataclasses.replace(key, plan=PrecisionPlan.for_precision("fp16").identity()),
        dataclasses.replace(key, resolution=1024),
    ]
    names = {key.filename, *(variant.filename for variant in variants)}
    assert len(names) == len(variants) + 1
    assert key.filename == key_for(info).filename  # deterministic
    assert key.filename.startswith("sharp-exported-fp32-") and key.filename.endswith(".pt2")


def copy_of_the_engine(tmp_path: Path) -> Path:
    """A copy of the engine's source to edit: the digest reads source, never imports it."""
    root = tmp_path / "src"
    shutil.copytree(REPO / "engine", root / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_graph_code_digest_covers_every_network_module(tmp_path):
    root = copy_of_the_engine(tmp_path)
    network_dir = root / "engine" / "network"
    first = graph_code_digest(source_root=root)
    # A new module, listed by no one: the digest follows the composer's import to it.
    (network_dir / "helper.py").write_text("z = 1\n")
    composer = network_dir / "composer.py"
    composer.write_text(composer.read_text() + "\nfrom engine.network.helper import z\n")
    second = graph_code_digest(source_root=root)
    precision = root / "engine" / "runtime" / "precision.py"
    precision.write_text(precision.read_text() + "\ny = 2\n")
    assert len({first, second, graph_code_digest(source_root=root)}) == 3


@pytest.mark.parametrize(
    "module",
    ["engine/network/color.py", "engine/network/vit.py", "engine/__init__.py"],
)
def test_a_stale_key_is_impossible_when_imported_code_changes(tmp_path, module):
    """Edit any module the traced code imports, even indirectly: the artifact key changes."""
    root = copy_of_the_engine(tmp_path)
    assert module in {
        str(path.relative_to(root)) for path in graph_modules(source_root=root).values()
    }
    before = graph_code_digest(source_root=root)
    (root / module).write_text((root / module).read_text() + "\n# edited\n")
    assert graph_code_digest(source_root=root) != before


def test_code_outside_the_graph_keeps_the_key(tmp_path):
    root = copy_of_the_engine(tmp_path)
    before = graph_code_digest(source_root=root)
    for module in ("engine/splats/formats/ply.py", "engine/runtime/serving.py"):
        (root / module).write_text((root / module).read_text() + "\n# edited\n")
    assert graph_code_digest(source_root=root) == before
    assert graph_code_digest() == graph_code_digest(source_root=REPO)  # the real tree


def test_the_graph_roots_reach_every_traced_module_class():
    """The module classes of a traced network (mixed precision, tuple outputs) all come from
    modules whose source is in the digest."""
    network = TupleOutputs(mixed_network(build_untrained(), PrecisionPlan.for_precision("fp16")))
    covered = set(graph_modules())
    traced = {type(m).__module__ for m in network.modules()}
    project = {name for name in traced if name.split(".")[0] == "engine"}
    assert project and project <= covered, project - covered
    assert "engine.network.color" in covered  # a function, not a module class, in the graph


def test_build_lock_excludes_and_breaks_stale_locks(tmp_path):
    path = tmp_path / "a.lock"
    first = BuildLock(path)
    first.acquire()
    with pytest.raises(LockHeld):
        BuildLock(path).acquire()
    first.release()
    assert not path.exists()
    # a lock left by a dead process of this host is stale at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    assert BuildLock(path).owner() is None
    with BuildLock(path).held():
        assert json.loads(path.read_text())["pid"] == os.getpid()
    # a lock whose heartbeat stopped is stale after stale_after_s, whoever holds it
    path.write_text(json.dumps({"host": "another-worker", "pid": 1}))
    old = time.time() - 120
    os.utime(path, (old, old))
    assert BuildLock(path, stale_after_s=60).owner() is None
    os.utime(path)
    assert BuildLock(path, stale_after_s=60).owner() == {"host": "another-worker", "pid": 1}


def test_heartbeat_keeps_a_long_build_lock_alive(tmp_path):
    lock = BuildLock(tmp_path / "b.lock", stale_after_s=0.4)
    with lock.held():
        time.sleep(1.0)  # longer than stale_after_s: only the heartbeat keeps it fresh
        assert BuildLock(tmp_path / "b.lock", stale_after_s=0.4).owner() is not None


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "engine.pt2"
    target.write_bytes(b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    moved = set_aside(target, "test")
    assert not target.exists() and moved.read_bytes() == b"old"


# --- the runtime: find, validate, build in a child, switch ----------------------------------


def test_cpu_default_serves_eager_fp32_and_builds_nothing(network, info, tmp_path):
    runtime = NetworkRuntime(network, CPU, info, engine_settings(tmp_path, backend="auto"))
    active = runtime.start()
    assert (active.name, active.precision) == ("eager", "fp32") and not runtime.pending
    assert runtime.build is None and not any(tmp_path.iterdir())


def test_a_half_plan_that_misses_tolerance_serves_fp32_and_targets_fp32(network, info, tmp_path):
    """bf16 on the tiny untrained model is off by ~0.016 in opacity (limit 0.001): refused,
    and the engine to build is then an fp32 one, not one of the plan that failed."""
    settings = engine_settings(tmp_path, precision="bf16", engine_build=False)
    runtime = NetworkRuntime(network, CPU, info, settings)
    assert (runtime.start().name, runtime.active.precision) == ("eager", "fp32")
    statuses = [(a.backend, a.precision, a.status) for a in runtime.report]
    assert statuses == [
        ("eager", "bf16", "refused"), ("eager", "fp32", "serving"), ("exported", "fp32", "off")
    ]  # fmt: skip
    assert "beyond tolerance" in runtime.report[0].reason


def test_a_cached_artifact_is_validated_and_served_at_start(network, info, built_artifact):
    runtime = NetworkRuntime(network, CPU, info, engine_settings(built_artifact.parent))
    active = runtime.start()
    assert (active.name, active.artifact) == ("exported", str(built_artifact))
    assert runtime.report[-1].status == "serving" and runtime.report[-1].max_errors["means"] == 0
    assert runtime.build is None and not runtime.pending


def test_an_artifact_that_disagrees_is_refused_and_eager_serves(network, info, inputs, tmp_path):
    perturbed = copy.deepcopy(network)
    with torch.no_grad():
        perturbed.prediction_head.texture_prediction_head.bias.add_(0.05)
    target = tmp_path / key_for(info).filename
    program = export_network(perturbed, inputs)
    write_atomic(target, lambda path: torch.export.save(program, path))
    runtime = NetworkRuntime(network, CPU, info, engine_settings(tmp_path))
    active = runtime.start()
    assert active.name == "eager" and not runtime.pending and runtime.build is None
    refused = runtime.report[-1]
    assert refused.backend == "exported" and refused.status == "refused"
    assert "beyond tolerance" in refused.reason


def test_a_corrupt_artifact_is_set_aside_and_rebuilt_once(
    network, info, inputs, reference, tmp_path
):
    target = tmp_path / key_for(info).filename
    target.write_bytes(b"not a torch.export archive")
    runtime = NetworkRuntime(network, CPU, info, engine_settings(tmp_path))
    assert runtime.start().name == "eager"
    assert [a.status for a in runtime.report[-2:]] == ["set-aside", "building"]
    assert list(tmp_path.glob(target.name + ".bad-*"))
    job = runtime.build
    assert job is not None and job.process.pid != os.getpid()  # a child process builds
    assert runtime.wait(timeout_s=600), job.failure_reason()
    assert runtime.active.name == "exported" and runtime.active.artifact == str(target)
    with torch.inference_mode():
        served = SharpOutput(*runtime.active.forward(*inputs))
    assert all(v == 0 for v in output_errors(reference, served).values())


def test_a_failed_build_is_reported_and_eager_goes_on(network, tmp_path):
    """A real failure: the checkpoint the worker loaded is gone when the child reads it."""
    checkpoint = tmp_path / "sharp_tiny.pt"
    torch.save(network.state_dict(), checkpoint)
    loaded, info = load_network(checkpoint)
    runtime = NetworkRuntime(loaded, CPU, info, engine_settings(tmp_path / "engines"))
    runtime.start()
    checkpoint.write_bytes(b"truncated")
    assert runtime.build is not None and runtime.wait(timeout_s=300)
    failed = runtime.report[-1]
    assert (
        failed.status == "failed" and "build failed" in failed.reason and "exit 2" in failed.reason
    )
    assert runtime.active.name == "eager" and not runtime.pending
    assert not list((tmp_path / "engines").glob("*.pt2"))


def test_another_workers_live_build_is_waited_for(network, info, built_artifact, tmp_path):
    key = key_for(info)
    lock = BuildLock(tmp_path / (key.filename + ".lock"))
    lock.acquire()  # held by this live process: "another worker" from the child's view
    try:
        runtime = NetworkRuntime(network, CPU, info, engine_settings(tmp_path))
        runtime.start()
        deadline = time.monotonic() + 300
        while runtime.build is not None and time.monotonic() < deadline:
            runtime.poll()  # the child exits 3: the lock is held
            time.sleep(0.5)
        assert runtime.report[-1].status == "waiting" and runtime.active.name == "eager"
        (tmp_path / key.filename).write_bytes(built_artifact.read_bytes())
        assert runtime.poll() and runtime.active.name == "exported"
    finally:
        lock.release()


# --- the race the child process avoids ------------------------------------------------------

# Run in a fresh interpreter: the old design's failed exports can leave torch's process-wide
# tracing state behind, which must not reach the tests that run after this one.
_RACE = r"""
import json, subprocess, sys, threading
import torch

TOY = (
    "import torch\nfrom torch import nn\ntorch.manual_seed(0)\ntorch.set_num_threads(1)\n"
    "net = nn.Sequential(*[nn.Linear(128, 128) for _ in range(40)]).eval()\n"
    "x = torch.randn(4, 128)\n"
)
exec(TOY)
with torch.no_grad():
    expected = net(x)
good, bad, stop = [0], [0], threading.Event()

def serve():
    while not stop.is_set():
        try:
            with torch.no_grad():
                ok = torch.equal(net(x), expected)
        except Exception:  # any failure of a served forward counts
            ok = False
        (good if ok else bad)[0] += 1

def in_a_thread():  # the old design: export beside serving, in the serving process
    errors = []
    for _ in range(3):
        try:
            torch.export.export(net, (x,), strict=False)
        except Exception as error:
            errors.append(type(error).__name__)
    return errors

def in_a_child():  # the new design: the build is another process
    code = TOY + "for _ in range(3):\n    torch.export.export(net, (x,), strict=False)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return [] if result.returncode == 0 else [result.stderr[-300:]]

thread = threading.Thread(target=serve)
thread.start()
try:
    errors = {"thread": in_a_thread, "child": in_a_child}[sys.argv[1]]()
finally:
    stop.set()
    thread.join()
print(json.dumps({"good": good[0], "bad": bad[0], "errors": errors}))
"""


def _serve_while_exporting(design: str) -> dict:
    """Forwards in one thread while the design's export runs: good and bad forwards, errors."""
    result = subprocess.run(
        [sys.executable, "-c", _RACE, design],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.splitlines()[-1])


def test_export_in_the_serving_process_breaks_requests_and_a_child_process_does_not():
    old = _serve_while_exporting("thread")
    assert old["bad"] > 0, f"the race did not show: the old design's failure not reproduced {old}"
    new = _serve_while_exporting("child")
    assert new["bad"] == 0 and new["good"] > 0 and new["errors"] == [], new


# --- the worker keeps serving during the build, then switches ---------------------------------


def test_worker_serves_correct_results_while_it_builds_then_switches(tmp_path):
    image = decode_image(SAMPLE.read_bytes())
    expected = SharpPredictor.from_checkpoint(TINY_UNTRAINED, device="cpu").predict(image)
    expected_spz = encode(
        expected.gaussians, "spz", image_width=image.width, image_height=image.height,
        focal_length_px=image.focal_length_px,
    ).data  # fmt: skip
    sample_b64 = base64.b64encode(SAMPLE.read_bytes()).decode()
    env = {"SHARP_BACKEND": "exported", "SHARP_ENGINE_DIR": str(tmp_path / "engines")}
    backends = []
    with worker_server(env, tmp_path / "worker.log") as server:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            answer = server.runsync({"image": sample_b64, "output_format": "spz"}, timeout=300)
            assert answer["status"] == "COMPLETED", answer
            out = answer["output"]
            assert "backend_report" not in out
            same = base64.b64decode(out["spz"]) == expected_spz  # not pytest's diff of 9 MB
            assert same, f"job {len(backends)} on {out['backend']} differs"
            backends.append(out["backend"])
            if out["backend"] == "exported":
                break
            # Idle gaps, as between real requests: the build child runs at a lower priority,
            # and back-to-back CPU forwards on 2 cores would leave it almost no time.
            time.sleep(5)
        log = server.log.read_text()
    build_logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "engines").glob("logs/*.log"))
    assert backends[0] == "eager" and backends[-1] == "exported", (
        f"{backends}\n--- worker log ---\n{log[-3000:]}\n--- build log ---\n{build_logs}"
    )
    assert "building" in log and "Switched to exported/fp32" in log
    assert list((tmp_path / "engines").glob("sharp-exported-fp32-*.pt2"))


def test_every_backend_is_defined_once_and_named_in_the_settings(info):
    assert SETTINGS_BACKENDS == ("auto", *BACKENDS, "eager")
    for name, backend in BACKENDS.items():
        key = dataclasses.replace(key_for(info), kind=name)
        assert key.filename.endswith(backend.suffix) and f"-{name}-" in key.filename
    with pytest.raises(ValueError, match="artifact kind must be one of tensorrt, compiled"):
        artifact_backend("torch.compile")
