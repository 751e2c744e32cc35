"""Parity with Apple's reference implementation on the golden cases (tests/data/golden).

Every case goes through the public loading path (a checkpoint file with the golden
weights), the product's image decoder, resize, network, unprojection and .ply writer, and
is compared within the tolerances of the golden README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_case

from engine.io.images import decode_image
from engine.runtime.predictor import SharpPredictor, network_gaussians
from engine.splats.formats.ply import write_ply
from engine.splats.gaussians import Gaussians, covariances_from, postprocess

SH_C0 = 0.28209479177387814


def covariance6(quaternions: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(xx, xy, xz, yy, yz, zz) in float64."""
    cov = covariances_from(
        torch.tensor(quaternions, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64)
    ).numpy()
    return cov[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]


def assert_covariances_close(actual: np.ndarray, expected: np.ndarray) -> None:
    bound = 1e-3 * np.abs(expected).max(axis=1) + 1e-12
    worst = (np.abs(actual - expected).max(axis=1) / bound).max()
    assert worst <= 1.0, f"covariance error {worst:.3g} x tolerance"


def assert_means_close(actual: np.ndarray, expected: np.ndarray) -> None:
    tolerance = 1e-4 * np.median(expected[:, 2])
    assert np.abs(actual - expected).max() <= tolerance


def vertex_rows(ply: bytes) -> tuple[bytes, np.ndarray]:
    """Header bytes and the (N, 14) float32 vertex rows of a binary .ply."""
    end = ply.index(b"end_header\n") + len(b"end_header\n")
    header = ply[:end]
    count = int(header.split(b"element vertex ")[1].split(b"\n")[0])
    rows = np.frombuffer(ply, dtype="<f4", count=count * 14, offset=end).reshape(count, 14)
    return header, rows


def run_case(predictor: SharpPredictor, golden_dir, name: str):
    data, expected = load_case(golden_dir, name)
    image = decode_image(data)
    assert (image.height, image.width) == (expected["image_height"], expected["image_width"])
    assert image.focal_length_px == pytest.approx(float(expected["focal_length_px"]), rel=1e-9)
    with torch.inference_mode():
        output = predictor.network(
            predictor.preprocess(image.rgb),
            torch.tensor([image.focal_length_px / image.width]),
        )
    ndc = network_gaussians(output)
    metric = postprocess(
        ndc,
        focal_length_px=image.focal_length_px,
        image_width=image.width,
        image_height=image.height,
    )
    ply = write_ply(
        metric,
        image_width=image.width,
        image_height=image.height,
        focal_length_px=image.focal_length_px,
        layout="sharp",
    )
    return expected, output.disparity[0], ndc, metric, ply


def check_case(expected, disparity: torch.Tensor, ndc: Gaussians, metric: Gaussians, ply: bytes):
    k = int(expected["subsample_every"])
    assert len(metric) == expected["num_gaussians"]
    np.testing.assert_allclose(
        disparity[:, ::8, ::8].numpy(), expected["disparity"], rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(ndc.colors[::k].numpy(), expected["color_linear"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ndc.opacities[::k].numpy(), expected["opacity"], rtol=0, atol=1e-4)
    assert_means_close(ndc.means[::k].numpy(), expected["ndc_mean"])
    assert_covariances_close(
        covariance6(ndc.quaternions[::k].numpy(), ndc.scales[::k].numpy()),
        expected["ndc_covariance6"],
    )
    assert_means_close(metric.means[::k].numpy(), expected["mean"])
    assert_covariances_close(
        covariance6(metric.quaternions[::k].numpy(), metric.scales[::k].numpy()),
        expected["covariance6"],
    )

    # The .ply in the reference layout: same header bytes, same size, rows within tolerance.
    assert len(ply) == expected["ply_num_bytes"]
    header, rows = vertex_rows(ply)
    assert header == expected["ply_header"].tobytes()
    ours, theirs = rows[::k], expected["ply_vertex_rows"]
    assert_means_close(ours[:, 0:3], theirs[:, 0:3])
    np.testing.assert_allclose(SH_C0 * ours[:, 3:6], SH_C0 * theirs[:, 3:6], rtol=0, atol=1e-4)
    sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
    np.testing.assert_allclose(sigmoid(ours[:, 6]), sigmoid(theirs[:, 6]), rtol=0, atol=1e-4)
    assert_covariances_close(
        covariance6(ours[:, 10:14], np.exp(ours[:, 7:10])),
        covariance6(theirs[:, 10:14], np.exp(theirs[:, 7:10])),
    )
    extras = ply[len(header) + rows.nbytes :]
    # Little-endian arrays, as in the file.
    expected_extras = b"".join(
        expected[f"ply_element_{name}"].tobytes()
        for name in ("extrinsic", "intrinsic", "image_size", "frame")
    )
    assert extras.startswith(expected_extras)
    disparity_range = np.frombuffer(extras, "<f4", count=2, offset=len(expected_extras))
    np.testing.assert_allclose(disparity_range, expected["ply_element_disparity"], rtol=1e-4)
    assert extras[len(expected_extras) + 8 :] == bytes(
        [*expected["ply_element_color_space"], *expected["ply_element_version"]]
    )


@pytest.fixture(scope="module")
def tiny_predictor(tiny_checkpoint) -> SharpPredictor:
    return SharpPredictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.mark.parametrize("name", ["tiny_astronaut", "tiny_chelsea_rgba", "tiny_coffee_exif"])
def test_tiny_case(tiny_predictor, golden_dir, name):
    check_case(*run_case(tiny_predictor, golden_dir, name))


def test_full_case_with_official_shapes(official_checkpoint, golden_dir):
    """The official configuration: ~2 minutes of CPU, run in CI as well."""
    predictor = SharpPredictor.from_checkpoint(official_checkpoint, device="cpu")
    assert predictor.network.config.vit.embed_dim == 1024
    check_case(*run_case(predictor, golden_dir, "full_astronaut"))
