"""Compiled artifacts on disk: what they are keyed by, and how they are written, locked and set aside.

An artifact (a TensorRT engine, an AOTInductor package, an exported program) is valid only for
the exact inputs of its build, so its file name is a digest of all of them (`ArtifactKey`):
the kind, GPU and compute capability, the CUDA/torch/TensorRT versions, the checkpoint's
digest, a digest of the code that defines the traced graph (`graph_code`), the precision plan and the input
resolution. A worker finds an artifact by computing the key, never by trusting a hand list.

Files are written to a temporary name and renamed, so a reader never sees half a file. Builds
take `BuildLock`, a lock file with a heartbeat: a build whose process died (a worker scaled down
mid-build) leaves a lock that stops beating, which the next builder breaks after STALE_LOCK_S.
It works on network volumes without flock. A file that fails to load is moved aside, not
deleted, so that it can be inspected, and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.io.checkpoint import CheckpointInfo, file_digest
from engine.runtime.backends import artifact_backend
from engine.runtime.files import read_json
from engine.runtime.graph_code import graph_code_digest
from engine.runtime.precision import PrecisionPlan

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = 2  # bump when a saved artifact's calling convention changes
HEARTBEAT_S = 10.0
STALE_LOCK_S = 60.0  # a lock not touched for this long belongs to a dead build


def graph_digest(program: torch.export.ExportedProgram) -> str:
    """SHA-256 of a traced graph's code and signature: recorded in each build's manifest."""
    text = program.graph_module.code + str(program.graph_signature)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def checkpoint_digest(info: CheckpointInfo) -> str:
    """SHA-256 of the checkpoint file; for the built-in untrained model, of its configuration."""
    if info.path is not None:
        return file_digest(info.path)
    return "untrained-" + hashlib.sha256(repr(info.config).encode()).hexdigest()[:20]


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
    """(GPU name, compute capability 'major.minor'); ('cpu', '') on the CPU."""
    if device.type != "cuda":
        return "cpu", ""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass(frozen=True)
class ArtifactKey:
    kind: str  # a name in backends.BACKENDS
    gpu: str
    capability: str
    versions: tuple[tuple[str, str], ...]
    checkpoint: str  # checkpoint_digest()
    code: str  # graph_code_digest()
    plan: str  # PrecisionPlan.identity()
    resolution: int
    format: int = ARTIFACT_FORMAT

    @classmethod
    def create(
        cls, kind: str, device: torch.device, checkpoint: str, plan: PrecisionPlan, resolution: int
    ) -> ArtifactKey:
        artifact_backend(kind)  # raises for an unknown kind
        gpu, capability = gpu_identity(device)
        versions = tuple(sorted(runtime_versions().items()))
        return cls(
            kind,
            gpu,
            capability,
            versions,
            checkpoint,
            graph_code_digest(),
            plan.identity(),
            resolution,
        )

    @property
    def precision(self) -> str:
        return self.plan.split(":", 1)[0]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def filename(self) -> str:
        return self.filename_for(self.kind, self.precision, self.digest())

    @staticmethod
    def filename_for(kind: str, precision: str, digest: str) -> str:
        return f"sharp-{kind}-{precision}-{digest}{artifact_backend(kind).suffix}"

    @property
    def manifest_name(self) -> str:
        return self.filename + ".json"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "versions": dict(self.versions)}


def find_artifact(name: str, directories: Sequence[Path]) -> Path | None:
    return next((d / name for d in directories if (d / name).is_file()), None)


def set_aside(path: Path, reason: str) -> Path | None:
    """Move a file that failed to load (and its manifest) out of the way; None if it is gone."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.bad-{stamp}")
    try:
        os.replace(path, target)
    except OSError as error:
        logger.warning("Cannot move %s aside: %s", path, error)
        return None
    with contextlib.suppress(OSError):
        os.replace(path.with_name(path.name + ".json"), target.with_name(target.name + ".json"))
    logger.warning("Moved %s aside to %s: %s", path.name, target.name, reason)
    return target


class LockHeld(RuntimeError):
    """Another live build holds the lock."""


class BuildLock:
    """An exclusive lock file beside an artifact, kept alive by a heartbeat thread.

    The file holds the owner's host, pid and start time. It is stale when its mtime is older
    than `stale_after_s`, or when it names a process of this host that no longer exists.
    """

    def __init__(self, path: Path, *, stale_after_s: float = STALE_LOCK_S) -> None:
        self.path = path
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner(self) -> dict[str, Any] | None:
        """The live owner's record, or None when the lock is free or stale."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        record = read_json(self.path) or {}
        if age > self.stale_after_s:
            return None
        if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
            return None
        return record or {"unreadable": True}

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; LockHeld when a live build has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is not None:
                    raise LockHeld(f"{self.path} is held by {owner}") from None
                logger.warning("Breaking the stale build lock %s", self.path)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="build-lock", daemon=True)
            self._thread.start()
            return
        raise LockHeld(f"{self.path} was taken by another build while breaking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def _beat(self) -> None:
        interval = min(HEARTBEAT_S, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
