"""Tests for the geometric post-processing in engine.splats.gaussians: unprojection and the closed-form
covariance factorization, against independent formulas, torch.linalg and the golden data."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from engine.splats import gaussians as gaussians_module
from engine.splats.gaussians import (
    Gaussians,
    covariances_from,
    decompose_covariances,
    postprocess,
    quaternions_from_rotations,
    rotations_from_quaternions,
    unproject,
)
from tests import gaussian_data

UPPER = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # covariance6 order


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random proper rotations, float64."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.linalg.det(q)[:, None, None]


def spd(rotations: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    return rotations @ torch.diag_embed(eigenvalues) @ rotations.mT


def reconstruction_error(covariances: torch.Tensor) -> torch.Tensor:
    """Per matrix: max |R diag(s²) Rᵀ - C| / max |C|, for C's decomposition, in float64."""
    quaternions, scales = decompose_covariances(covariances)
    rebuilt = covariances_from(quaternions.double(), scales.double())
    c = covariances.double()
    return (rebuilt - c).abs().amax((-2, -1)) / c.abs().amax((-2, -1))


# In front of the camera, small, with rotations of any length (the code normalises them).
random_gaussians = partial(
    gaussian_data.random_gaussians, depth=(0.5, 3.5), log_scales=(-9.2, -3.0), quaternion_scale=2.0
)

# --- quaternions and rotations ----------------------------------------------------------------


def test_rotation_of_known_quaternion() -> None:
    half = math.sqrt(0.5)
    # 90 degrees about z maps x to y; any positive multiple or the negation is the same rotation.
    q = torch.tensor([[half, 0, 0, half], [3 * half, 0, 0, 3 * half], [-half, 0, 0, -half]])
    expected = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]).expand(3, 3, 3)
    torch.testing.assert_close(rotations_from_quaternions(q), expected, atol=1e-6, rtol=0)


def test_rotations_are_proper_and_orthonormal() -> None:
    q = torch.randn(10_000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = rotations_from_quaternions(q)
    torch.testing.assert_close(r @ r.mT, torch.eye(3, dtype=torch.float64).expand_as(r))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(len(q), dtype=torch.float64))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_quaternion_round_trip(dtype: torch.dtype, atol: float) -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    # Hard cases for sqrt-of-diagonal formulas: 180-degree turns (w = 0), axis-aligned turns,
    # identity, and components around 1e-4 whose squares cancel in the trace.
    q[:1000, 0] = 0
    q[1000:2000, 1:3] = 0
    q[2000:2001] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    q[3000:4000, 1:] *= 1e-4
    q[4000:5000, :3] *= 1e-4
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    q_back = quaternions_from_rotations(rotations_from_quaternions(q).to(dtype))
    assert q_back.dtype == dtype
    assert (q_back[:, 0] >= 0).all()
    torch.testing.assert_close(q_back.norm(dim=-1), torch.ones(len(q), dtype=dtype))
    # w = 0 leaves the sign of q undetermined: compare rotations there, quaternions elsewhere.
    torch.testing.assert_close(
        rotations_from_quaternions(q_back).double(),
        rotations_from_quaternions(q),
        atol=atol,
        rtol=0,
    )
    rest = slice(1000, None)
    torch.testing.assert_close(q_back[rest].double(), q[rest], atol=atol, rtol=0)


def test_covariances_from_matches_definition() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    s = torch.rand(1000, 3, generator=g, dtype=torch.float64)
    r = rotations_from_quaternions(q)
    torch.testing.assert_close(covariances_from(q, s), r @ torch.diag_embed(s * s) @ r.mT)


# --- decomposition ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4, 1e8])
def test_decomposition_reconstructs_random_covariances(
    dtype: torch.dtype, tolerance: float, condition: float
) -> None:
    g = torch.Generator().manual_seed(4)
    n = 50_000
    log_spread = torch.rand(n, 3, generator=g, dtype=torch.float64) * math.log10(condition)
    magnitude = 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 12 - 6)
    eigenvalues = magnitude * 10**-log_spread
    eigenvalues[:, 0] = magnitude[:, 0]  # spread exactly `condition` somewhere
    eigenvalues[:, 1] = magnitude[:, 0] / condition
    covariances = spd(random_rotations(n, g), eigenvalues).to(dtype)
    assert reconstruction_error(covariances).max() <= tolerance


def test_decomposition_eigenvalues_match_eigh() -> None:
    g = torch.Generator().manual_seed(5)
    covariances = spd(
        random_rotations(10_000, g), torch.rand(10_000, 3, generator=g, dtype=torch.float64)
    )
    _, scales = decompose_covariances(covariances)
    ours = (scales**2).sort(dim=-1).values
    torch.testing.assert_close(ours, torch.linalg.eigvalsh(covariances), atol=1e-14, rtol=0)


def degenerate_covariances() -> dict[str, torch.Tensor]:
    """Named batches of awkward symmetric PSD matrices, float64."""
    g = torch.Generator().manual_seed(6)
    n = 2000
    r = random_rotations(n, g)
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = torch.randn(n, 3, generator=g, dtype=torch.float64)

    def with_eigenvalues(*values: float) -> torch.Tensor:
        return spd(r, torch.tensor(values, dtype=torch.float64).expand(n, 3))

    diagonal = torch.diag_embed(torch.rand(n, 3, generator=g, dtype=torch.float64))
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    return {
        "isotropic": torch.eye(3, dtype=torch.float64) * torch.logspace(-20, 20, n)[:, None, None],
        "zero": torch.zeros(n, 3, 3, dtype=torch.float64),
        "two_equal_large": with_eigenvalues(2.0, 2.0, 1.0),
        "two_equal_small": with_eigenvalues(2.0, 1.0, 1.0),
        "nearly_equal": with_eigenvalues(1.0, 1.0 + 1e-7, 2.0),
        "nearly_isotropic": with_eigenvalues(1.0, 1.0 + 1e-7, 1.0 + 2e-7),
        "rank_one": v[:, :, None] * v[:, None, :],
        "rank_two": v[:, :, None] * v[:, None, :] + w[:, :, None] * w[:, None, :],
        "needle": with_eigenvalues(1.0, 1e-8, 1e-8),
        "disc": with_eigenvalues(1.0, 1.0, 1e-8),
        "diagonal": diagonal,
        "diagonal_negative_zero": diagonal.masked_fill(off_diagonal, -0.0),
        "tiny": with_eigenvalues(3e-30, 2e-30, 1e-30),
        "huge": with_eigenvalues(3e30, 2e30, 1e30),
    }


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", list(degenerate_covariances()))
def test_decomposition_of_degenerate_covariances(
    name: str, dtype: torch.dtype, tolerance: float
) -> None:
    covariances = degenerate_covariances()[name].to(dtype)
    quaternions, scales = decompose_covariances(covariances)
    assert torch.isfinite(quaternions).all() and torch.isfinite(scales).all()
    assert (scales > 0).all() and torch.isfinite(scales.log()).all()
    assert (quaternions[:, 0] >= 0).all()
    torch.testing.assert_close(quaternions.norm(dim=-1), torch.ones(len(quaternions), dtype=dtype))
    rotations = rotations_from_quaternions(quaternions.double())
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(len(rotations)).double())
    if name == "zero":
        assert (scales == torch.finfo(dtype).tiny ** 0.5).all()
    else:
        assert reconstruction_error(covariances).max() <= tolerance


def test_decomposition_matches_reference_svd() -> None:
    """Same covariances as the reference's fp64 SVD + reflection fix, from float32 input."""
    g = torch.Generator().manual_seed(7)
    covariances = spd(
        random_rotations(20_000, g), torch.rand(20_000, 3, generator=g, dtype=torch.float64) ** 4
    ).float()
    u, s2, _ = torch.linalg.svd(covariances.double())
    u[..., -1] *= torch.linalg.det(u)[:, None]
    reference = u @ torch.diag_embed(s2) @ u.mT
    quaternions, scales = decompose_covariances(covariances)
    ours = covariances_from(quaternions.double(), scales.double())
    error = (ours - reference).abs().amax((-2, -1)) / reference.abs().amax((-2, -1))
    assert error.max() <= 1e-5


def test_decomposition_symmetrizes_input() -> None:
    g = torch.Generator().manual_seed(8)
    c = spd(random_rotations(100, g), torch.rand(100, 3, generator=g, dtype=torch.float64))
    skew = torch.randn(100, 3, 3, generator=g, dtype=torch.float64) * 1e-3
    q1, s1 = decompose_covariances(c + skew - skew.mT)
    torch.testing.assert_close(covariances_from(q1, s1), c)


def test_decomposition_is_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    c = spd(random_rotations(1000, g), torch.rand(1000, 3, generator=g, dtype=torch.float64))
    whole = decompose_covariances(c)
    monkeypatch.setattr(gaussians_module, "_CPU_CHUNK", 77)  # 12 full chunks and a partial one
    for a, b in zip(decompose_covariances(c), whole):
        assert torch.equal(a, b)


def test_decomposition_of_nothing() -> None:
    quaternions, scales = decompose_covariances(torch.zeros(0, 3, 3))
    assert quaternions.shape == (0, 4) and scales.shape == (0, 3)


# --- unprojection -----------------------------------------------------------------------------


def reference_unprojection_matrix(
    focal_length_px: float, width: int, height: int, internal: int
) -> torch.Tensor:
    """inv(ndc @ K) as the reference builds it, in float64."""
    k = torch.tensor(
        [[focal_length_px, 0, width / 2, 0], [0, focal_length_px, height / 2, 0], [0, 0, 1, 0]]
        + [[0, 0, 0, 1]],
        dtype=torch.float64,
    )
    k[0] *= internal / width
    k[1] *= internal / height
    ndc = torch.tensor(
        [[2 / internal, 0, -1, 0], [0, 2 / internal, -1, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    return torch.linalg.inv(ndc @ k)


@pytest.mark.parametrize(
    "width, height, focal", [(512, 512, 502.06), (451, 300, 375.6), (3024, 4032, 2800)]
)
def test_unproject_applies_the_reference_transform(width: int, height: int, focal: float) -> None:
    transform = reference_unprojection_matrix(focal, width, height, internal=1536)
    linear, offset = transform[:3, :3], transform[:3, 3]
    ndc = random_gaussians(5000)
    out = unproject(ndc, focal_length_px=focal, image_width=width, image_height=height)
    expected_means = ndc.means.double() @ linear.T + offset
    torch.testing.assert_close(out.means.double(), expected_means, atol=1e-6, rtol=1e-6)
    expected = linear @ covariances_from(ndc.quaternions.double(), ndc.scales.double()) @ linear.T
    ours = covariances_from(out.quaternions.double(), out.scales.double())
    error = (ours - expected).abs().amax((-2, -1)) / expected.abs().amax((-2, -1))
    assert error.max() <= 1e-5
    assert out.colors is ndc.colors and out.opacities is ndc.opacities


def test_unproject_rejects_bad_intrinsics() -> None:
    with pytest.raises(ValueError):
        unproject(random_gaussians(3), focal_length_px=0.0, image_width=10, image_height=10)


def test_postprocess_returns_float32_from_half_precision() -> None:
    ndc = random_gaussians(1000)
    half = Gaussians(*(t.to(torch.bfloat16) for t in ndc.tensors()))
    out = postprocess(half, focal_length_px=500.0, image_width=640, image_height=480)
    assert all(t.dtype == torch.float32 for t in out.tensors())
    assert len(out) == 1000 and torch.isfinite(out.scales).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_postprocess_on_cuda_matches_cpu() -> None:
    ndc = random_gaussians(100_000)
    kwargs = {"focal_length_px": 500.0, "image_width": 640, "image_height": 480}
    cpu = postprocess(ndc, **kwargs)
    cuda = postprocess(ndc.to("cuda"), **kwargs)
    assert cuda.means.is_cuda
    torch.testing.assert_close(cuda.means.cpu(), cpu.means)
    torch.testing.assert_close(
        covariances_from(cuda.quaternions.cpu().double(), cuda.scales.cpu().double()),
        covariances_from(cpu.quaternions.double(), cpu.scales.double()),
        atol=1e-9,
        rtol=1e-5,
    )


# --- golden parity ----------------------------------------------------------------------------


def ndc_gaussians(golden: dict[str, np.ndarray]) -> Gaussians:
    names = ("ndc_mean", "ndc_scale", "ndc_quat", "color_linear", "opacity")
    return Gaussians(*(torch.from_numpy(golden[name]) for name in names))


def covariance6(quaternions: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    c = covariances_from(quaternions.double(), scales.double())
    return torch.stack([c[:, i, j] for i, j in UPPER], dim=-1).numpy()


def test_golden_ndc_covariances(golden: dict[str, np.ndarray]) -> None:
    ours = covariance6(torch.from_numpy(golden["ndc_quat"]), torch.from_numpy(golden["ndc_scale"]))
    expected = golden["ndc_covariance6"]
    tolerance = 1e-3 * np.abs(expected).max(axis=1) + 1e-12
    assert (np.abs(ours - expected).max(axis=1) <= tolerance).all()


def test_golden_postprocess(golden: dict[str, np.ndarray]) -> None:
    out = postprocess(
        ndc_gaussians(golden),
        focal_length_px=float(golden["focal_length_px"]),
        image_width=int(golden["image_width"]),
        image_height=int(golden["image_height"]),
    )
    median_depth = np.median(golden["mean"][:, 2])
    assert np.abs(out.means.numpy() - golden["mean"]).max() <= 1e-4 * median_depth

    expected = golden["covariance6"]
    ours = covariance6(out.quaternions, out.scales)
    tolerance = 1e-3 * np.abs(expected).max(axis=1) + 1e-12
    assert (np.abs(ours - expected).max(axis=1) <= tolerance).all()
    # Far inside the tolerance: float32 throughout is enough.
    assert (np.abs(ours - expected).max(axis=1) <= 1e-5 * np.abs(expected).max(axis=1)).all()
