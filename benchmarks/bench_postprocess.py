"""Post-processing and .ply export of one full SHARP result (1,179,648 Gaussians) on the CPU:
ours against a baseline that does what Apple's reference does.

Run: .venv/bin/python -m pytest benchmarks/bench_postprocess.py --benchmark-enable
Both run in the same group, so pytest-benchmark's table shows the ratio; the terminal summary
(benchmarks/conftest.py) and ours' extra_info state the speedup explicitly.

One thread (torch.set_num_threads(1) while this module runs), to measure "one CPU core": with
two threads on a busy 2-core machine, OpenMP workers spinning after each of ours' many small
elementwise ops steal the main thread's core and the timings scatter by 10x.

Ours: engine.splats.gaussians.postprocess (closed-form float32 eigensolver) + engine.splats.formats.ply.write_ply.
Baseline, as the reference's unproject_gaussians + save_ply: the unprojection matrix inverted
in float32, covariances composed and transformed with batched float32 matrix products, an fp64
SVD on the CPU with the reflection fix, SciPy's matrix-to-quaternion conversion, and .ply rows
filled row by row from Python tuples. Both write the "sharp" layout; before timing, the two
files are checked to hold the same Gaussians.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engine.splats.formats.ply import SH_C0, VERTEX_PROPERTIES, read_ply, write_ply
from engine.splats.gaussians import (
    Gaussians,
    covariances_from,
    postprocess,
    quaternions_from_rotations,
    rotations_from_quaternions,
)

GRID = 768  # Gaussians per side and layer: SHARP's 1536 px internal image at stride 2
LAYERS = 2
INTERNAL_RESOLUTION = 1536
CAMERA = {"image_width": 4032, "image_height": 3024, "focal_length_px": 3200.0}
GROUP = "postprocess + .ply, 1,179,648 Gaussians"


def sharp_like_ndc_gaussians(seed: int = 0) -> Gaussians:
    """NDC Gaussians shaped like the network's: two layers of a 768x768 grid, smooth depth,
    pixel-sized scales, unnormalized quaternions, colors and opacities in 0..1."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
    x_ndc, y_ndc = (u / GRID * 2 - 1).reshape(-1), (v / GRID * 2 - 1).reshape(-1)
    depth = 3.0 + torch.sin(3 * x_ndc) + 0.5 * torch.cos(2 * y_ndc)
    n = GRID * GRID
    z = torch.cat([depth + 0.5 * layer + 0.05 * torch.rand(n, generator=g) for layer in range(2)])
    x_ndc, y_ndc = x_ndc.repeat(LAYERS), y_ndc.repeat(LAYERS)
    pixel = z * 2 / GRID  # one grid cell at depth z, in NDC x z units
    return Gaussians(
        means=torch.stack([x_ndc * z, y_ndc * z, z], dim=-1),
        scales=pixel[:, None] * torch.exp(0.5 * torch.randn(LAYERS * n, 3, generator=g)),
        quaternions=2 * torch.randn(LAYERS * n, 4, generator=g),
        colors=torch.rand(LAYERS * n, 3, generator=g),
        opacities=torch.sigmoid(2 * torch.randn(LAYERS * n, generator=g)),
    )


def ours(ndc: Gaussians) -> bytes:
    return write_ply(postprocess(ndc, **CAMERA), **CAMERA, layout="sharp")


def reference_like(ndc: Gaussians) -> bytes:
    f, width, height = CAMERA["focal_length_px"], CAMERA["image_width"], CAMERA["image_height"]
    s = INTERNAL_RESOLUTION
    intrinsics = torch.tensor(
        [[f, 0, width / 2, 0], [0, f, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    intrinsics[0] *= s / width
    intrinsics[1] *= s / height
    to_ndc = torch.tensor([[2 / s, 0, -1, 0], [0, 2 / s, -1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    transform = torch.linalg.inv(to_ndc @ intrinsics)[:3]
    linear, offset = transform[:, :3], transform[:, 3]

    means = ndc.means @ linear.T + offset
    rotations = rotations_from_quaternions(ndc.quaternions)
    covariances = rotations @ torch.diag_embed(ndc.scales.square()) @ rotations.mT
    covariances = linear @ covariances @ linear.T
    u, variances, _ = torch.linalg.svd(covariances.double())
    u[..., -1] *= torch.linalg.det(u)[:, None]  # reflections to rotations
    quaternions = quaternions_like_scipy(u).float()
    scales = variances.sqrt().float()

    c = ndc.colors
    srgb = torch.where(
        c <= 0.0031308, c * 12.92, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055
    )
    o = ndc.opacities
    attributes = torch.cat(
        [means, (srgb - 0.5) / SH_C0, torch.log(o / (1 - o))[:, None], scales.log(), quaternions],
        dim=1,
    )
    rows = np.empty(len(attributes), dtype=[(name, "<f4") for name in VERTEX_PROPERTIES])
    rows[:] = list(map(tuple, attributes.numpy()))
    disparity = torch.quantile(1 / means[:, 2], torch.tensor([0.1, 0.9]))
    metadata = b"".join(
        [
            np.eye(4, dtype="<f4").tobytes(),
            np.array([f, 0, width / 2, 0, f, height / 2, 0, 0, 1], dtype="<f4").tobytes(),
            np.array([width, height], dtype="<u4").tobytes(),
            np.array([1, len(rows)], dtype="<i4").tobytes(),
            disparity.numpy().astype("<f4").tobytes(),
            bytes([0, 1, 5, 0]),  # color_space sRGB, version 1.5.0
        ]
    )
    return sharp_header(len(rows)) + rows.tobytes() + metadata


def quaternions_like_scipy(rotations: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) via SciPy as the reference does; our Shepperd conversion if it is absent."""
    try:
        from scipy.spatial.transform import Rotation
    except ImportError:
        return quaternions_from_rotations(rotations)
    xyzw = Rotation.from_matrix(rotations.numpy()).as_quat()
    return torch.from_numpy(xyzw[:, [3, 0, 1, 2]])


def sharp_header(n: int) -> bytes:
    """The reference's header, written out independently of engine.splats.formats.ply."""
    extras = [
        ("extrinsic", 16, "float"),
        ("intrinsic", 9, "float"),
        ("image_size", 2, "uint"),
        ("frame", 2, "int"),
        ("disparity", 2, "float"),
        ("color_space", 1, "uchar"),
        ("version", 3, "uchar"),
    ]
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    lines += [f"property float {name}" for name in VERTEX_PROPERTIES]
    for name, count, kind in extras:
        lines += [f"element {name} {count}", f"property {kind} {name}"]
    return ("\n".join([*lines, "end_header"]) + "\n").encode()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ndc() -> Gaussians:
    return sharp_like_ndc_gaussians()


@pytest.fixture(scope="module")
def same_output(ndc: Gaussians) -> None:
    """Both implementations write the same file, up to float rounding, on a subset."""
    subset = ndc.index(torch.arange(0, len(ndc), 97))
    a, b = read_ply(ours(subset)), read_ply(reference_like(subset))
    assert a.vertices.dtype == b.vertices.dtype and a.elements.keys() == b.elements.keys()
    for name in a.elements:
        np.testing.assert_allclose(a.elements[name], b.elements[name], rtol=1e-6)
    ga, gb = a.gaussians, b.gaussians
    torch.testing.assert_close(ga.means, gb.means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.colors, gb.colors)
    torch.testing.assert_close(ga.opacities, gb.opacities)
    ca = covariances_from(ga.quaternions.double(), ga.scales.double())
    cb = covariances_from(gb.quaternions.double(), gb.scales.double())
    error = (ca - cb).abs().amax((-2, -1)) / cb.abs().amax((-2, -1))
    assert error.max() < 1e-4


@pytest.mark.benchmark(group=GROUP)
def test_reference_like(benchmark, ndc: Gaussians, same_output: None, timings: dict) -> None:
    data = benchmark.pedantic(reference_like, args=(ndc,), rounds=2, iterations=1)
    assert len(data) == len(sharp_header(len(ndc))) + 56 * len(ndc) + 128
    if not benchmark.disabled:
        timings["baseline (reference-like)"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=GROUP)
def test_ours(benchmark, ndc: Gaussians, same_output: None, timings: dict) -> None:
    data = benchmark.pedantic(ours, args=(ndc,), rounds=5, iterations=1, warmup_rounds=1)
    assert data[: len(sharp_header(len(ndc)))] == sharp_header(len(ndc))
    if not benchmark.disabled:
        timings["ours"] = benchmark.stats.stats.min
        baseline = timings.get("baseline (reference-like)")
        if baseline is not None:
            benchmark.extra_info["speedup_vs_reference_like"] = round(baseline / timings["ours"], 1)
