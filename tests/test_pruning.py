"""Tests for engine.splats.pruning: exact opacity cuts, exact top-K by importance with index
tie-breaks, original order, the importance formula against a direct projection, and argument
validation."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from engine.splats.gaussians import Gaussians
from engine.splats.pruning import VIEWER_DILATION_PX2, importance, prune
from tests import gaussian_data

FOCAL = 800.0


random_gaussians = partial(
    gaussian_data.random_gaussians, depth=(1.0, 10.0), log_scales=(-7.0, -3.0)
)


def with_opacities(g: Gaussians, opacities: list[float]) -> Gaussians:
    return Gaussians(g.means, g.scales, g.quaternions, g.colors, torch.tensor(opacities))


def kept_indices(g: Gaussians, kept: Gaussians) -> list[int]:
    """Indices of the kept Gaussians in g (means are distinct in these tests)."""
    matches = (kept.means[:, None, :] == g.means[None, :, :]).all(dim=-1)
    assert bool((matches.sum(dim=1) == 1).all())
    return matches.int().argmax(dim=1).tolist()


def covariances(quaternions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """R diag(s²) Rᵀ, R from the unit quaternion via torch's axis-angle route (independent of
    the module's closed form)."""
    q = quaternions / quaternions.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(q[:, 1:].norm(dim=-1), q[:, 0])
    axis = q[:, 1:] / q[:, 1:].norm(dim=-1, keepdim=True)
    cross = torch.zeros(len(q), 3, 3, dtype=q.dtype)
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    rotation = torch.linalg.matrix_exp(angle[:, None, None] * (cross - cross.transpose(1, 2)))
    return rotation @ torch.diag_embed(scales.square()) @ rotation.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# min_opacity
# ---------------------------------------------------------------------------------------------


def test_min_opacity_drops_exactly_those_below() -> None:
    g = with_opacities(random_gaussians(6), [0.1, 0.5, 0.4999, 0.5, 0.9, 0.0])
    kept = prune(g, min_opacity=0.5)
    assert kept_indices(g, kept) == [1, 3, 4]
    assert len(kept) == 3
    assert len(prune(g, min_opacity=0.0)) == 6
    assert kept_indices(g, prune(g, min_opacity=1.0)) == []


def test_nothing_to_prune_returns_the_input() -> None:
    g = random_gaussians(10)
    assert prune(g) is g
    assert prune(g, max_gaussians=10, focal_length_px=FOCAL) is g
    assert prune(g, min_opacity=0.0, max_gaussians=50, focal_length_px=FOCAL) is g


# ---------------------------------------------------------------------------------------------
# max_gaussians
# ---------------------------------------------------------------------------------------------


def test_max_gaussians_keeps_the_k_largest_scores_in_original_order() -> None:
    g = random_gaussians(1000)
    scores = importance(g, focal_length_px=FOCAL).numpy()
    for k in (1, 37, 999):
        kept = prune(g, max_gaussians=k, focal_length_px=FOCAL)
        expected = np.sort(np.argsort(-scores, kind="stable")[:k])
        assert kept_indices(g, kept) == expected.tolist()
        assert torch.equal(kept.means, g.means[torch.from_numpy(expected)])


def test_ties_at_the_cut_keep_the_lowest_indices() -> None:
    g = random_gaussians(8)
    # Identical shapes and opacities give identical scores at equal depth; vary x and y only
    # by sign so that every Gaussian projects to the same footprint.
    signs = torch.tensor([[1, 1], [-1, 1], [1, -1], [-1, -1]] * 2, dtype=torch.float32)
    means = torch.cat([signs * 0.5, torch.full((8, 1), 3.0)], dim=1)
    means[4:, 2] = 2.0  # nearer, so larger on screen: these four outrank the first four
    tied = Gaussians(
        means=means,
        scales=torch.full((8, 3), 0.01),
        quaternions=torch.tensor([[1.0, 0, 0, 0]]).expand(8, 4),
        colors=g.colors,
        opacities=torch.full((8,), 0.8),
    )
    scores = importance(tied, focal_length_px=FOCAL)
    assert len(set(scores[:4].tolist())) == 1 and len(set(scores[4:].tolist())) == 1
    assert scores[4] > scores[0]
    assert kept_indices(tied, prune(tied, max_gaussians=6, focal_length_px=FOCAL)) == [
        0, 1, 4, 5, 6, 7,
    ]  # fmt: skip
    assert kept_indices(tied, prune(tied, max_gaussians=2, focal_length_px=FOCAL)) == [4, 5]


def test_min_opacity_applies_before_max_gaussians() -> None:
    g = random_gaussians(500)
    scores = importance(g, focal_length_px=FOCAL).numpy()
    eligible = g.opacities.numpy() >= 0.3
    scores[~eligible] = -np.inf
    expected = np.sort(np.argsort(-scores, kind="stable")[:100])
    kept = prune(g, min_opacity=0.3, max_gaussians=100, focal_length_px=FOCAL)
    assert kept_indices(g, kept) == expected.tolist()
    assert bool((kept.opacities >= 0.3).all())


def test_pruning_is_deterministic() -> None:
    g = random_gaussians(2000)
    first = prune(g, min_opacity=0.1, max_gaussians=700, focal_length_px=FOCAL)
    second = prune(g, min_opacity=0.1, max_gaussians=700, focal_length_px=FOCAL)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), second.tensors()))


# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


def test_importance_is_opacity_times_the_projected_footprint() -> None:
    g = random_gaussians(300)
    # Direct: J Σ Jᵀ with the perspective Jacobian, in float64, plus the viewers' dilation.
    m = g.means.double()
    x, y, z = m.unbind(-1)
    zero = torch.zeros_like(z)
    jacobian = torch.stack(
        [
            torch.stack([FOCAL / z, zero, -FOCAL * x / z**2], dim=-1),
            torch.stack([zero, FOCAL / z, -FOCAL * y / z**2], dim=-1),
        ],
        dim=1,
    )
    covariance = covariances(g.quaternions.double(), g.scales.double())
    screen = jacobian @ covariance @ jacobian.transpose(1, 2)
    screen = screen + VIEWER_DILATION_PX2 * torch.eye(2, dtype=torch.float64)
    expected = g.opacities.double() * torch.linalg.det(screen).sqrt()
    torch.testing.assert_close(
        importance(g, focal_length_px=FOCAL).double(), expected, rtol=1e-4, atol=0
    )


def test_importance_of_a_disc_facing_the_camera() -> None:
    # On the axis at z = 2, semi-axes 0.01 and 0.02 m across the view, thin along it:
    # a = f * 0.01 / 2 = 4 px and b = 8 px, so sqrt((a² + 0.3)(b² + 0.3)) px².
    disc = Gaussians(
        means=torch.tensor([[0.0, 0.0, 2.0]]),
        scales=torch.tensor([[0.01, 0.02, 1e-6]]),
        quaternions=torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        colors=torch.zeros(1, 3),
        opacities=torch.tensor([0.5]),
    )
    expected = 0.5 * math.sqrt((16 + 0.3) * (64 + 0.3))
    assert importance(disc, focal_length_px=FOCAL).item() == pytest.approx(expected, rel=1e-6)
    # Seen edge-on (rotated 90° about y) the disc shows 1e-6 m x 0.02 m: the dilation dominates.
    edge_on = Gaussians(
        disc.means, disc.scales, torch.tensor([[math.sqrt(0.5), 0.0, math.sqrt(0.5), 0.0]]),
        disc.colors, disc.opacities,
    )  # fmt: skip
    expected = 0.5 * math.sqrt((0.0004**2 + 0.3) * (64 + 0.3))
    assert importance(edge_on, focal_length_px=FOCAL).item() == pytest.approx(expected, rel=1e-4)


def test_gaussians_behind_the_camera_score_zero() -> None:
    g = random_gaussians(4)
    means = g.means.clone()
    means[:2, 2] = torch.tensor([-1.0, 0.0])
    scores = importance(Gaussians(means, *g.tensors()[1:]), focal_length_px=FOCAL)
    assert scores[:2].tolist() == [0.0, 0.0] and bool((scores[2:] > 0).all())


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan])
def test_invalid_min_opacity(value: float) -> None:
    with pytest.raises(ValueError, match="min_opacity"):
        prune(random_gaussians(5), min_opacity=value)


@pytest.mark.parametrize("value", [0, -3, 2.5, "10"])
def test_invalid_max_gaussians(value: object) -> None:
    with pytest.raises(ValueError, match="max_gaussians must be an integer >= 1"):
        prune(random_gaussians(5), max_gaussians=value, focal_length_px=FOCAL)


@pytest.mark.parametrize("focal", [None, 0.0, -5.0, math.inf, math.nan])
def test_max_gaussians_needs_a_focal_length(focal: float | None) -> None:
    with pytest.raises(ValueError, match="focal_length_px"):
        prune(random_gaussians(5), max_gaussians=2, focal_length_px=focal)
