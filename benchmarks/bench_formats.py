"""Encode time and size per splat format for one full SHARP result (1,179,648 Gaussians).

Run: .venv/bin/python -m pytest benchmarks/bench_formats.py --benchmark-enable -s
Single-threaded (torch.set_num_threads(1)) to measure "one CPU core". The Gaussians are
synthetic but shaped like SHARP's: two layers of a 768x768 grid over a 1536x1536 photo
(samples/coffee.jpg gives the colours), smooth depth, pixel-sized scales, random rotations and
mostly opaque alphas, so the compressed sizes are indicative, not exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.splats.formats import FORMATS, encode
from engine.splats.gaussians import Gaussians

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coffee.jpg"
GRID = 768  # Gaussians per side and layer: a 1536 px image at stride 2
LAYERS = 2
IMAGE_SIZE = 2 * GRID
FOCAL_LENGTH_PX = 1400.0
SIZES: dict[str, int] = {}


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


@pytest.fixture(scope="module")
def gaussians() -> Iterator[Gaussians]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sharp_like_gaussians()
    torch.set_num_threads(threads)


CASES = [(f, {}) for f in FORMATS if f != "spz"] + [("spz", {"spz_version": v}) for v in (2, 3, 4)]


@pytest.mark.parametrize(
    ("fmt", "options"), CASES, ids=[f + "".join(f"-v{v}" for v in o.values()) for f, o in CASES]
)
def test_encode(benchmark, gaussians: Gaussians, fmt: str, options: dict) -> None:
    kwargs = dict(
        image_width=IMAGE_SIZE, image_height=IMAGE_SIZE, focal_length_px=FOCAL_LENGTH_PX, **options
    )
    encoded = benchmark.pedantic(encode, (gaussians, fmt), kwargs, rounds=5, warmup_rounds=1)
    name = benchmark.name.split("[")[1].rstrip("]")
    benchmark.extra_info["bytes"] = len(encoded.data)
    benchmark.extra_info["bytes_per_gaussian"] = len(encoded.data) / len(gaussians)
    SIZES[name] = len(encoded.data)


def teardown_module() -> None:
    if not SIZES:
        return
    reference = SIZES.get("ply")
    print(f"\n{'format':<10}{'bytes':>14}{'B/Gaussian':>12}{'vs .ply':>9}")
    for name, size in SIZES.items():
        ratio = f"{reference / size:.1f}x" if reference else "-"
        print(f"{name:<10}{size:>14,}{size / (GRID * GRID * LAYERS):>12.2f}{ratio:>9}")
