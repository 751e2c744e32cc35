"""Which backend serves, and the switch to a compiled one between jobs.

At start the runtime serves eager, validated: the configured precision (fp16 on CUDA) when it
agrees with eager float32 on the validation input, else float32 itself. It then looks for the
artifact of the preferred backend under its key (see engine.runtime.artifacts):

  * found: loaded, validated once against eager float32, and served;
  * missing: built by a child process (engine.runtime.builds) while eager serves; `poll()`,
    called between jobs, picks the new file up, validates it and switches;
  * a file that fails to load is moved aside and rebuilt once; a build that fails, or an
    artifact that fails validation, is logged with its reason, and eager goes on serving.

Nothing here exports or compiles. `active` is read once per request, so a request in flight
finishes on the backend it started with.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.io.checkpoint import TINY_UNTRAINED, CheckpointInfo
from engine.network import SharpNetwork, SharpOutput
from engine.runtime.artifacts import (
    ArtifactKey,
    BuildLock,
    checkpoint_digest,
    find_artifact,
    set_aside,
)
from engine.runtime.backends import NetworkFn, artifact_backend, eager_forward, preferred_kind
from engine.runtime.builds import EXIT_LOCK_HELD, BuildJob, BuildRequest, launch_build
from engine.runtime.precision import PrecisionPlan
from engine.runtime.validation import Validation, reference_output, validate, validation_input
from engine.settings import EngineSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveBackend:
    name: str  # eager | exported | compiled | tensorrt
    precision: str
    plan: PrecisionPlan
    forward: NetworkFn = field(repr=False)
    artifact: str | None = None  # the file it was loaded from


@dataclass
class Attempt:
    """One line of the report: a backend tried, and what became of it."""

    backend: str
    precision: str
    status: str  # serving | superseded | refused | building | waiting | failed | set-aside | off
    reason: str = ""
    seconds: float | None = None
    artifact: str | None = None
    max_errors: dict[str, float | None] | None = None


@dataclass
class _Target:
    key: ArtifactKey
    plan: PrecisionPlan
    rebuilt: bool = False  # a corrupt file has been rebuilt once already
    job: BuildJob | None = None
    waiting_since: float | None = None  # another worker's build holds the lock


class NetworkRuntime:
    def __init__(
        self,
        network: SharpNetwork,
        device: torch.device,
        checkpoint: CheckpointInfo,
        settings: EngineSettings,
    ) -> None:
        self.network = network
        self.device = device
        self.checkpoint = checkpoint
        self.settings = settings
        self.resolution = network.config.internal_resolution
        self.report: list[Attempt] = []
        self._active: ActiveBackend | None = None
        self._target: _Target | None = None
        self._reference: SharpOutput | None = None

    @property
    def active(self) -> ActiveBackend:
        if self._active is None:
            raise RuntimeError("no backend is active: call start() first")
        return self._active

    @property
    def build(self) -> BuildJob | None:
        return self._target.job if self._target is not None else None

    @property
    def pending(self) -> bool:
        """Whether a compiled backend may still replace the one serving."""
        return self._target is not None

    def start(self) -> ActiveBackend:
        plan = PrecisionPlan.for_precision(
            self.settings.resolved_precision(self.device.type), self.settings.fp32_blocks
        )
        if plan.precision != "fp32" and not self._activate_eager(plan):
            plan = PrecisionPlan("fp32")  # an engine of a plan that misses tolerance would too
        if plan.precision == "fp32":
            self._serve(ActiveBackend("eager", "fp32", plan, self.network))
            self._record("eager", "fp32", "serving", "the reference")
        kind = preferred_kind(self.settings.backend, self.device)
        if kind is not None:
            key = ArtifactKey.create(
                kind, self.device, checkpoint_digest(self.checkpoint), plan, self.resolution
            )
            self._target = _Target(key, plan)
            self._look_for_artifact()
        self._done_if_settled()
        self.log_report("start")
        return self.active

    def poll(self) -> bool:
        """Between jobs: pick up a finished build. True when the backend switched. Never blocks
        on a build; loading and validating a new artifact takes a few seconds, once."""
        target = self._target
        if target is None:
            return False
        before = self._active
        if target.job is not None:
            code = target.job.poll()
            if code is None:
                return False
            job, target.job = target.job, None
            if code == 0:
                self._look_for_artifact(after_build=True)
            elif code == EXIT_LOCK_HELD:
                target.waiting_since = time.monotonic()
                self._record(
                    target.key.kind,
                    target.plan.precision,
                    "waiting",
                    "another worker is building it",
                )
            else:
                self._record(
                    target.key.kind,
                    target.plan.precision,
                    "failed",
                    f"build failed after {job.seconds:.0f} s ({job.failure_reason()})",
                )
                self._target = None
        elif target.waiting_since is not None:
            lock = BuildLock(self._engine_dir() / (target.key.filename + ".lock"))
            if (
                find_artifact(target.key.filename, self.settings.artifact_dirs())
                or lock.owner() is None
            ):
                target.waiting_since = None
                self._look_for_artifact()
        self._done_if_settled()
        switched = self._active is not before
        if switched or self._target is None:
            self.log_report("switch" if switched else "settled")
        return switched

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.5) -> bool:
        """Poll until no build is pending (tests and the CLI); True when settled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._target is not None:
            self.poll()
            if self._target is None or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(interval_s)
        return self._target is None

    def close(self) -> None:
        if self._target is not None and self._target.job is not None:
            self._target.job.stop()

    def log_report(self, when: str) -> None:
        logger.info(
            "Backend %s/%s (%s): %s",
            self.active.name,
            self.active.precision,
            when,
            json.dumps([asdict(a) for a in self.report]),
        )

    # --- steps --------------------------------------------------------------------------

    def _activate_eager(self, plan: PrecisionPlan) -> bool:
        start = time.perf_counter()
        forward = eager_forward(self.network, plan)
        verdict = self._validate(forward, plan.precision)
        if verdict is None or not verdict.passed:
            reason = "failed to run" if verdict is None else verdict.describe()
            self._record("eager", plan.precision, "refused", reason, start, verdict)
            return False
        self._serve(ActiveBackend("eager", plan.precision, plan, forward))
        self._record(
            "eager", plan.precision, "serving", f"validated ({plan.describe()})", start, verdict
        )
        return True

    def _look_for_artifact(self, after_build: bool = False) -> None:
        target = self._target
        assert target is not None
        kind, precision = target.key.kind, target.plan.precision
        path = find_artifact(target.key.filename, self.settings.artifact_dirs())
        if path is None:
            if after_build:
                self._record(kind, precision, "failed", "the build exited 0 but left no artifact")
                self._target = None
            elif not self.settings.engine_build:
                self._record(
                    kind, precision, "off", f"no {target.key.filename}; SHARP_ENGINE_BUILD=off"
                )
                self._target = None
            else:
                self._launch(target)
            return
        start = time.perf_counter()
        try:
            forward = artifact_backend(kind).load(path, self.device)
        except Exception as error:
            reason = f"failed to load {path.name}: {_describe(error)}"
            set_aside(path, reason)  # a read-only prebuilt file stays; the rebuild shadows it
            if self.settings.engine_build and not target.rebuilt:
                self._record(kind, precision, "set-aside", reason + "; rebuilding once", start)
                target.rebuilt = True
                self._launch(target)
            else:
                self._record(kind, precision, "failed", reason, start)
                self._target = None
            return
        verdict = self._validate(forward, precision)
        if verdict is None or not verdict.passed:
            reason = "failed to run" if verdict is None else verdict.describe()
            self._record(kind, precision, "refused", f"{path.name}: {reason}", start, verdict)
            self._target = None
            return
        self._serve(ActiveBackend(kind, precision, target.plan, forward, str(path)))
        self._record(kind, precision, "serving", "validated", start, verdict, str(path))
        self._target = None

    def _launch(self, target: _Target) -> None:
        checkpoint = self.checkpoint.path or (TINY_UNTRAINED if self.checkpoint.untrained else None)
        if checkpoint is None:
            self._record(
                target.key.kind, target.plan.precision, "failed", "no checkpoint file to build from"
            )
            self._target = None
            return
        request = BuildRequest(
            str(checkpoint), target.key, target.plan, self._engine_dir(), self.device.type
        )
        try:
            target.job = launch_build(request, self._engine_dir() / "logs")
        except OSError as error:
            self._record(
                target.key.kind, target.plan.precision, "failed", f"cannot start the build: {error}"
            )
            self._target = None
            return
        self._record(
            target.key.kind,
            target.plan.precision,
            "building",
            f"child pid {target.job.process.pid}, log {target.job.log_path}",
        )

    def _validate(self, forward: NetworkFn, precision: str) -> Validation | None:
        inputs = validation_input(self.resolution, self.device)
        try:
            if self._reference is None:
                self._reference = reference_output(self.network, inputs)
            with torch.inference_mode():
                candidate = SharpOutput(*forward(*inputs))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return validate(self._reference, candidate, precision)
        except Exception as error:
            logger.warning("Validation run failed: %s", _describe(error))
            return None

    def _serve(self, backend: ActiveBackend) -> None:
        previous = self._active
        self._active = backend
        if previous is not None:
            for attempt in self.report:
                if attempt.status == "serving":
                    attempt.status = "superseded"
        logger.info(
            "%s %s/%s",
            "Switched to" if previous else "Serving with",
            backend.name,
            backend.precision,
        )

    def _done_if_settled(self) -> None:
        if self._target is None:
            self._reference = None  # the validation reference is only needed while one is pending

    def _engine_dir(self) -> Path:
        return self.settings.engine_directory

    def _record(
        self,
        backend: str,
        precision: str,
        status: str,
        reason: str,
        start: float | None = None,
        verdict: Validation | None = None,
        artifact: str | None = None,
    ) -> None:
        seconds = round(time.perf_counter() - start, 2) if start is not None else None
        errors = verdict.to_json()["max_errors"] if verdict is not None else None
        self.report.append(Attempt(backend, precision, status, reason, seconds, artifact, errors))
        log = logger.warning if status in ("refused", "failed", "set-aside") else logger.info
        log("Backend %s/%s: %s (%s)", backend, precision, status, reason)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]
