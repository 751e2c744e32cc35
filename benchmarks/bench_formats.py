"""Encode time and size per splat format for one full SHARP result (1,179,648 Gaussians).

Run: .venv/bin/python -m pytest benchmarks/bench_formats.py --benchmark-enable -s

Two inputs:
  * real: the pipeline's own output, the tiny untrained model on samples/coffee.jpg (strided
    tensors, as the worker and the CLI encode them): every format, .spz in versions 2, 3 and 4,
    .sog at every effort level. PlayCanvas's splat-transform converts the .ply of the same
    Gaussians to .sog and .spz for comparison (one timed run each, node's start-up included),
    when an install of it is found (tests/js/node_modules, else /tmp/st/node_modules); else
    those rows are skipped.
  * synthetic: Gaussians shaped like SHARP's (two layers of a 768x768 grid over a 1536x1536
    photo, samples/coffee.jpg for the colours, smooth depth, pixel-sized scales, random
    rotations, mostly opaque), every format at its default settings; compressed sizes there
    are indicative only.

torch runs on one thread (torch.set_num_threads(1)) to measure "one CPU core" of quantization:
with two threads on a busy 2-core machine, OpenMP workers spinning after each small elementwise
op steal the cores and the timings scatter. The .sog writer's WebP encodes run in their own
threads (up to 5, one per image, on as many cores as there are), so its wall time uses both
cores of a 2-core machine; the summary shows wall and CPU seconds.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.splats.formats import FORMATS, encode
from engine.splats.formats.sog import DEFAULT_EFFORT, EFFORTS, write_sog
from engine.splats.gaussians import Gaussians

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "coffee.jpg"
SPLAT_TRANSFORM_BINS = (
    ROOT / "tests" / "js" / "node_modules" / ".bin" / "splat-transform",
    Path("/tmp/st/node_modules/.bin/splat-transform"),
)
GRID = 768  # Gaussians per side and layer: a 1536 px image at stride 2
LAYERS = 2
IMAGE_SIZE = 2 * GRID
FOCAL_LENGTH_PX = 1400.0


@dataclass
class Row:
    bytes: int
    wall_s: float  # best of the rounds
    cpu_s: float  # process CPU time of one run


ROWS: dict[str, Row] = {}


def sharp_like_gaussians(seed: int = 0) -> Gaussians:
    generator = torch.Generator().manual_seed(seed)
    image = Image.open(SAMPLE).convert("RGB").resize((GRID, GRID), Image.Resampling.BILINEAR)
    srgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).reshape(-1, 3)
    colors = torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)

    v, u = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
    x_ndc, y_ndc = (u / GRID * 2 - 1).reshape(-1), (v / GRID * 2 - 1).reshape(-1)
    depth = 2.0 + 0.5 * torch.sin(3 * x_ndc) + 0.3 * torch.cos(2 * y_ndc)
    layers = []
    for layer in range(LAYERS):
        z = depth + 0.4 * layer + 0.01 * torch.randn(depth.shape, generator=generator)
        half_width = z * IMAGE_SIZE / (2 * FOCAL_LENGTH_PX)
        means = torch.stack([x_ndc * half_width, y_ndc * half_width, z], dim=-1)
        pixel = z / FOCAL_LENGTH_PX  # one pixel at depth z, in metres
        scales = pixel[:, None] * torch.exp(0.5 * torch.randn(len(z), 3, generator=generator))
        layers.append((means, scales))
    n = GRID * GRID * LAYERS
    return Gaussians(
        means=torch.cat([m for m, _ in layers]),
        scales=torch.cat([s for _, s in layers]),
        quaternions=torch.randn(n, 4, generator=generator),
        colors=colors.repeat(LAYERS, 1),
        opacities=torch.sigmoid(2 + 2 * torch.randn(n, generator=generator)),
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic() -> Gaussians:
    return sharp_like_gaussians()


@pytest.fixture(scope="module")
def real() -> tuple[Gaussians, dict]:
    """The pipeline's Gaussians for samples/coffee.jpg (tiny untrained model) and its camera."""
    from engine.io.checkpoint import TINY_UNTRAINED
    from engine.io.images import decode_image
    from engine.runtime.predictor import SharpPredictor

    predictor = SharpPredictor.from_checkpoint(TINY_UNTRAINED, "cpu")
    prediction = predictor.predict(decode_image(SAMPLE.read_bytes()))
    camera = {
        "image_width": prediction.image_width,
        "image_height": prediction.image_height,
        "focal_length_px": prediction.focal_length_px,
    }
    return prediction.gaussians, camera


def encode_bytes(gaussians: Gaussians, fmt: str, camera: dict, options: dict) -> bytes:
    if fmt == "sog" and "effort" in options:
        return write_sog(gaussians, effort=options["effort"])
    return encode(gaussians, fmt, **camera, **options).data


def record(benchmark, label: str, gaussians: Gaussians, fmt: str, camera: dict, options: dict):
    rounds = 5 if options.get("effort", 0) <= 2 else 1
    data = benchmark.pedantic(
        encode_bytes,
        (gaussians, fmt, camera, options),
        rounds=rounds,
        warmup_rounds=1 if rounds > 1 else 0,
    )
    cpu = time.process_time()
    encode_bytes(gaussians, fmt, camera, options)
    cpu = time.process_time() - cpu
    benchmark.extra_info["bytes"] = len(data)
    benchmark.extra_info["bytes_per_gaussian"] = len(data) / len(gaussians)
    benchmark.extra_info["cpu_s"] = cpu
    # With --benchmark-disable (pytest's default here) the one run is untimed: time it then.
    stats = benchmark.stats.stats if benchmark.stats else None
    wall = stats.min if stats else _timed(encode_bytes, gaussians, fmt, camera, options)
    ROWS[label] = Row(len(data), wall, cpu)


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def case_id(fmt: str, options: dict) -> str:
    return fmt + "".join(f"-{'v' if k == 'spz_version' else 'e'}{v}" for k, v in options.items())


REAL_CASES = [
    ("ply", {}),
    *[("spz", {"spz_version": v}) for v in (2, 3, 4)],
    ("splat", {}),
    *[("sog", {"effort": e}) for e in sorted(EFFORTS)],
]
SYNTHETIC_CASES = [(f, {}) for f in FORMATS if f != "spz"] + [
    ("spz", {"spz_version": v}) for v in (2, 3, 4)
]


@pytest.mark.parametrize(("fmt", "options"), REAL_CASES, ids=[case_id(*c) for c in REAL_CASES])
def test_real(benchmark, real, fmt: str, options: dict) -> None:
    gaussians, camera = real
    record(benchmark, f"real {case_id(fmt, options)}", gaussians, fmt, camera, options)


@pytest.mark.parametrize(
    ("fmt", "options"), SYNTHETIC_CASES, ids=[case_id(*c) for c in SYNTHETIC_CASES]
)
def test_synthetic(benchmark, synthetic, fmt: str, options: dict) -> None:
    camera = {
        "image_width": IMAGE_SIZE,
        "image_height": IMAGE_SIZE,
        "focal_length_px": FOCAL_LENGTH_PX,
    }
    record(benchmark, f"synthetic {case_id(fmt, options)}", synthetic, fmt, camera, options)


def splat_transform() -> Path:
    for path in SPLAT_TRANSFORM_BINS:
        if path.is_file():
            return path
    found = shutil.which("splat-transform")
    if found is None or shutil.which("node") is None:
        pytest.skip("splat-transform is not installed (tests/js/node_modules or /tmp/st)")
    return Path(found)


@pytest.mark.parametrize("fmt", ["sog", "spz"])
def test_splat_transform(real, fmt: str, tmp_path: Path) -> None:
    """PlayCanvas's converter on the .ply of the same Gaussians: one run, wall and CPU time."""
    command = splat_transform()
    gaussians, camera = real
    source = tmp_path / "coffee.ply"
    source.write_bytes(encode(gaussians, "ply", **camera).data)
    target = tmp_path / f"coffee.{fmt}"
    start, before = time.perf_counter(), _children_cpu()
    subprocess.run([str(command), "-w", "-q", str(source), str(target)], check=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - before
    ROWS[f"real splat-transform {fmt}"] = Row(target.stat().st_size, wall, cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def teardown_module() -> None:
    if not ROWS:
        return
    print(f"\n.sog default effort: {DEFAULT_EFFORT}")
    print(f"{'case':<30}{'bytes':>13}{'B/Gaussian':>12}{'vs .ply':>9}{'wall s':>9}{'CPU s':>8}")
    for label, row in ROWS.items():
        reference = ROWS.get(f"{label.split()[0]} ply")
        ratio = f"{reference.bytes / row.bytes:.1f}x" if reference else "-"
        per_gaussian = row.bytes / (GRID * GRID * LAYERS)
        print(
            f"{label:<30}{row.bytes:>13,}{per_gaussian:>12.2f}{ratio:>9}"
            f"{row.wall_s:>9.3f}{row.cpu_s:>8.2f}"
        )
