"""Shared fixtures: the golden fixtures in tests/data/golden, and checkpoints made from them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.io.fixture_weights import fixture_weights

# Figures measured from Apple's reference implementation, in the repository (see its README).
GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: an input photo and the reference's expected arrays."""

    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def input_path(self) -> Path:
        (path,) = self.folder.glob("input.*")
        return path

    @property
    def expected_path(self) -> Path:
        return self.folder / "expected.npz"

    def expected(self) -> dict[str, np.ndarray]:
        with np.load(self.expected_path) as arrays:
            return dict(arrays)


GOLDEN_CASES = tuple(GoldenCase(p.parent) for p in sorted(GOLDEN_DIR.glob("cases/*/expected.npz")))


def golden_fixtures_found() -> bool:
    return len(GOLDEN_CASES) == 4 and (GOLDEN_DIR / "tiny_state_dict.tsv").is_file()


def pytest_report_header() -> list[str]:
    """The machine, at the top of every run's output: a slow CI run then says why."""
    memory = (
        dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()[:3])
        if Path("/proc/meminfo").exists()
        else {}
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    facts = (
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)",
        f"torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"load {' '.join(f'{x:.2f}' for x in load)}",
        f"memory available {memory.get('MemAvailable', '?').strip()}",
        f"golden fixtures {'found' if golden_fixtures_found() else 'missing'}",
    )
    return ["machine: " + ", ".join(facts)]


def read_shapes(tsv: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a golden `*_state_dict.tsv` (key, dtype, AxBxC)."""
    shapes = {}
    for line in tsv.read_text().splitlines():
        key, _dtype, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return shapes


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden fixtures; a clone without them is broken, not a reason to skip."""
    assert golden_fixtures_found(), f"golden fixtures missing under {GOLDEN_DIR}"
    return GOLDEN_DIR


@pytest.fixture(params=GOLDEN_CASES, ids=lambda case: case.name)
def golden_case(request: pytest.FixtureRequest) -> GoldenCase:
    """Each golden case in turn."""
    return request.param


@pytest.fixture
def golden(golden_case: GoldenCase) -> dict[str, np.ndarray]:
    """Each golden case's expected arrays in turn."""
    return golden_case.expected()


@pytest.fixture(scope="session")
def make_weights() -> Callable[[dict], dict[str, torch.Tensor]]:
    """The golden fixtures' deterministic weights (a pure function of key and shape)."""
    return fixture_weights


@pytest.fixture(scope="session")
def tiny_shapes(golden_dir: Path) -> dict[str, tuple[int, ...]]:
    return read_shapes(golden_dir / "tiny_state_dict.tsv")


@pytest.fixture(scope="session")
def official_shapes(golden_dir: Path) -> dict[str, tuple[int, ...]]:
    return read_shapes(golden_dir / "official_state_dict.tsv")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, make_weights, tiny_shapes) -> Path:
    """A checkpoint with every key of the tiny configuration, golden weights."""
    path = tmp_path_factory.mktemp("checkpoints") / "sharp_tiny.pt"
    torch.save(make_weights(tiny_shapes), path)
    return path


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, make_weights, official_shapes) -> Path:
    """Every key and shape of the official checkpoint with golden weights (2.8 GB on disk)."""
    path = tmp_path_factory.mktemp("checkpoints") / "sharp_official_shapes.pt"
    torch.save(make_weights(official_shapes), path)
    yield path
    path.unlink(missing_ok=True)


def load_case(golden_dir: Path, name: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """A golden case's input bytes and expected arrays."""
    case = GoldenCase(golden_dir / "cases" / name)
    return case.input_path.read_bytes(), case.expected()
