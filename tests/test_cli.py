"""The installed `sharp-runpod predict` command, end to end in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_case
from test_parity import assert_covariances_close, assert_means_close, covariance6, vertex_rows

CLI = Path(sys.executable).parent / "sharp-runpod"
SAMPLE = str(Path(__file__).resolve().parents[1] / "samples" / "coffee.jpg")


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    if not CLI.exists():
        pytest.fail(f"console script not installed at {CLI}: run `pip install -e .`")
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_folder_with_a_bad_file(tmp_path, tiny_checkpoint, golden_dir):
    data, expected = load_case(golden_dir, "tiny_astronaut")
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    (inputs / "nested" / "astronaut.png").write_bytes(data)
    (inputs / "notes.txt").write_text("not an image")
    (inputs / ".hidden.png").write_bytes(b"ignored")

    result = run_cli(
        "predict",
        str(inputs),
        "-o",
        str(tmp_path / "out"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
    )

    assert result.returncode == 1, result.stderr
    assert "notes.txt: FAILED" in result.stderr and "1 of 2 images failed" in result.stderr
    assert ".hidden" not in result.stderr + result.stdout
    assert "1,179,648 Gaussians, 512x512, focal 502.1 px (default)" in result.stdout
    header, rows = vertex_rows((tmp_path / "out" / "nested" / "astronaut.ply").read_bytes())
    # The standard layout: the vertex element alone.
    assert header.count(b"element ") == 1
    k = int(expected["subsample_every"])
    theirs = expected["ply_vertex_rows"]
    assert_means_close(rows[::k, 0:3], theirs[:, 0:3])
    assert_covariances_close(
        covariance6(rows[::k, 10:14], np.exp(rows[::k, 7:10])),
        covariance6(theirs[:, 10:14], np.exp(theirs[:, 7:10])),
    )


def test_sharp_layout_and_focal_override(tmp_path, tiny_checkpoint, golden_dir):
    data, expected = load_case(golden_dir, "tiny_coffee_exif")
    image = tmp_path / "coffee.jpg"
    image.write_bytes(data)
    result = run_cli(
        "predict",
        str(image),
        "-o",
        str(tmp_path / "out"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--ply-layout",
        "sharp",
        "--focal-px",
        "777",
    )
    assert result.returncode == 0, result.stderr
    assert "focal 777.0 px (override)" in result.stdout
    ply = (tmp_path / "out" / "coffee.ply").read_bytes()
    header, _ = vertex_rows(ply)
    assert header == expected["ply_header"].tobytes()
    assert len(ply) == expected["ply_num_bytes"]


def test_untrained_model_is_labelled(tmp_path):
    result = run_cli(
        "predict", SAMPLE, "-o", str(tmp_path), "--checkpoint", "tiny-untrained", "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stdout and "UNTRAINED" in result.stderr
    assert (tmp_path / "coffee.ply").stat().st_size == 1_179_648 * 56 + len(
        vertex_rows((tmp_path / "coffee.ply").read_bytes())[0]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "missing.jpg", "-o", "out"], "no such file: missing.jpg"),
        (
            ["predict", SAMPLE, "-o", "out", "--checkpoint", "nope.pt"],
            "checkpoint 'nope.pt' not found",
        ),
        (["predict", SAMPLE, "-o", "out", "--focal-px", "-3"], "--focal-px must be a positive"),
    ],
)
def test_bad_arguments_exit_non_zero(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_compact_format_with_pruning(tmp_path):
    from engine.splats.formats.spz import read_spz

    result = run_cli(
        "predict",
        SAMPLE,
        "-o",
        str(tmp_path),
        "--checkpoint",
        "tiny-untrained",
        "--device",
        "cpu",
        "--format",
        "spz",
        "--max-gaussians",
        "1000",
        "--min-opacity",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    assert "1,000 Gaussians (of 1,179,648)" in result.stdout
    gaussians = read_spz((tmp_path / "coffee.spz").read_bytes())
    assert len(gaussians) == 1000
    assert float(gaussians.opacities.min()) >= 0.1 - 1 / 255


def test_build_engine_subcommand_without_gpu(tmp_path):
    """It runs the build tool as its own process; on the CPU, auto has nothing to build."""
    result = run_cli(
        "build-engine", "--checkpoint", "tiny-untrained", "--output-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "skipped: no GPU" in result.stdout and not any(tmp_path.iterdir())
