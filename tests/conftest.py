"""Shared fixtures: the golden fixtures beside the clone, and checkpoints made from them."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def golden_fixtures_found() -> bool:
    return (GOLDEN_DIR / "README.md").is_file()


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
    if not golden_fixtures_found():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def make_weights(golden_dir: Path) -> Callable[[dict], dict[str, torch.Tensor]]:
    """The golden deterministic weight recipe (a pure function of key and shape)."""
    spec = importlib.util.spec_from_file_location("golden_weights", golden_dir / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_weights


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
    folder = golden_dir / "cases" / name
    image = next(folder.glob("input.*"))
    with np.load(folder / "expected.npz") as expected:
        return image.read_bytes(), dict(expected)
