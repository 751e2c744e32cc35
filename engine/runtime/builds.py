"""Engine builds in a child process: `python -m export.build_engine ...`, watched from the worker.

The serving process never exports or compiles: `torch.export` patches module calls process-wide
and swaps parameters for fake tensors while it traces, which breaks forwards served at the same
time, and a TensorRT build's memory would share the serving GPU context. A child process has
its own interpreter, CUDA context and weights; it writes the artifact atomically under a lock
and exits, and the worker picks the file up between jobs. The child runs at a lower CPU
priority so that request pre- and post-processing keep their cores.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.runtime.artifacts import ArtifactKey
from engine.runtime.precision import PrecisionPlan

logger = logging.getLogger(__name__)

CHILD_NICENESS = 10
EXIT_LOCK_HELD = 3  # the build tool's exit status when another live build holds the lock


@dataclass(frozen=True)
class BuildRequest:
    checkpoint: str  # a local file or tiny-untrained: the child must not download again
    key: ArtifactKey
    plan: PrecisionPlan
    output_dir: Path
    device: str  # "cuda" or "cpu"


@dataclass
class BuildJob:
    request: BuildRequest
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def poll(self) -> int | None:
        """The exit status once the child has finished, else None; never blocks."""
        return self.process.poll()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def failure_reason(self, lines: int = 3) -> str:
        """The last lines the child logged: where the build tool states why it failed."""
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            tail = []
        return f"exit {self.process.returncode}: " + (" | ".join(tail) or "no output")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def build_command(request: BuildRequest) -> list[str]:
    return [
        sys.executable,
        "-m",
        "export.build_engine",
        "--checkpoint",
        request.checkpoint,
        "--backend",
        request.key.kind,
        "--precision",
        request.plan.precision,
        "--fp32-blocks",
        ",".join(request.plan.fp32_blocks),
        "--output-dir",
        str(request.output_dir),
        "--device",
        request.device,
        "--expect-key",
        request.key.digest(),
        "--apple-parity",
        "off",
        # The child lowers its own priority (no preexec_fn in a threaded parent) and stops when
        # this worker is gone, so a dead worker's build never runs on unobserved.
        "--nice",
        str(CHILD_NICENESS),
        "--exit-with-parent",
    ]


def launch_build(request: BuildRequest, log_dir: Path) -> BuildJob:
    """Start the build tool as a child process, its output in a log file beside the engines."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-{request.key.digest()}-{os.getpid()}.log"
    command = build_command(request)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    logger.info(
        "Started engine build (pid %d): %s; log %s", process.pid, " ".join(command), log_path
    )
    return BuildJob(request, process, log_path)
