"""Tests for engine.splats.formats.ply: the golden reference files, both layouts as independent readers see
them (plyfile; antimatter15's splat viewer), round trips and the strict reader."""

from __future__ import annotations

import io
import math
import re
import struct
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_CASES

from engine.splats.formats.ply import (
    OPACITY_EPS,
    SH_C0,
    VERTEX_PROPERTIES,
    read_ply,
    save_ply,
    vertex_rows,
    write_ply,
)
from engine.splats.gaussians import Gaussians, covariances_from, postprocess
from tests import gaussian_data

SHARP_ELEMENTS = ("extrinsic", "intrinsic", "image_size", "frame", "disparity", "color_space")
CAMERA = {"image_width": 451, "image_height": 300, "focal_length_px": 375.57712001255226}


# In front of the camera, unit rotations with w >= 0, opacities whose logits are finite.
random_gaussians = partial(
    gaussian_data.random_gaussians,
    depth=(0.5, 3.5),
    log_scales=(-9.2, -3.0),
    unit_quaternions=True,
    opacities=(0.01, 0.99),
)


def covariances(g: Gaussians) -> torch.Tensor:
    return covariances_from(g.quaternions.double(), g.scales.double())


def assert_same_gaussians(ours: Gaussians, expected: Gaussians, median_depth: float) -> None:
    """The golden tolerances: means, covariances, colors and opacities after decoding."""
    assert (ours.means - expected.means).abs().max() <= 1e-4 * median_depth
    c_ours, c_expected = covariances(ours), covariances(expected)
    largest = c_expected.abs().amax((-2, -1))
    assert ((c_ours - c_expected).abs().amax((-2, -1)) <= 1e-3 * largest + 1e-12).all()
    assert (ours.colors - expected.colors).abs().max() <= 1e-4
    assert (ours.opacities - expected.opacities).abs().max() <= 1e-4


# --- golden parity ----------------------------------------------------------------------------


def golden_camera(golden: dict[str, np.ndarray]) -> dict[str, float | int]:
    return {
        "image_width": int(golden["image_width"]),
        "image_height": int(golden["image_height"]),
        "focal_length_px": float(golden["focal_length_px"]),
    }


def golden_output(golden: dict[str, np.ndarray]) -> Gaussians:
    names = ("ndc_mean", "ndc_scale", "ndc_quat", "color_linear", "opacity")
    ndc = Gaussians(*(torch.from_numpy(golden[name]) for name in names))
    return postprocess(ndc, **golden_camera(golden))


def test_golden_vertex_rows(golden: dict[str, np.ndarray]) -> None:
    assert tuple(golden["ply_vertex_names"]) == VERTEX_PROPERTIES
    ours = read_ply(write_ply(golden_output(golden), **golden_camera(golden), layout="sharp"))
    reference_rows = np.ascontiguousarray(golden["ply_vertex_rows"], dtype="<f4")
    reference = read_ply(write_ply_rows(reference_rows))
    assert_same_gaussians(
        ours.gaussians, reference.gaussians, float(np.median(golden["mean"][:, 2]))
    )
    # The reference stores SciPy's unit quaternions; ours are unit too (w >= 0 instead).
    torch.testing.assert_close(
        reference.gaussians.quaternions.norm(dim=-1), torch.ones(len(reference_rows))
    )


def write_ply_rows(rows: np.ndarray) -> bytes:
    """A standard-layout file around raw (N, 14) float32 rows."""
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
        + [f"property float {name}" for name in VERTEX_PROPERTIES]
        + ["end_header", ""]
    )
    return header.encode() + rows.tobytes()


def test_golden_metadata_elements(golden: dict[str, np.ndarray]) -> None:
    data = write_ply(golden_output(golden), **golden_camera(golden), layout="sharp")
    elements = read_ply(data).elements
    assert list(elements) == [*SHARP_ELEMENTS, "version"]
    for name in ("extrinsic", "intrinsic", "image_size", "color_space", "version"):
        expected = golden[f"ply_element_{name}"]
        assert elements[name].dtype == expected.dtype.newbyteorder("<")
        np.testing.assert_array_equal(elements[name], expected)
    # The subsample has fewer Gaussians than the reference file: frame counts ours.
    np.testing.assert_array_equal(elements["frame"], [1, len(golden["mean"])])


def test_golden_header_and_size_at_full_count() -> None:
    golden = GOLDEN_CASES[0].expected()
    n = int(golden["num_gaussians"])
    data = write_ply(random_gaussians(n), **golden_camera(golden), layout="sharp")
    header = golden["ply_header"].tobytes()
    assert data[: len(header)] == header
    assert len(data) == int(golden["ply_num_bytes"]) == len(header) + 56 * n + 128
    elements = read_ply(data).elements
    np.testing.assert_array_equal(elements["frame"], golden["ply_element_frame"])
    np.testing.assert_array_equal(elements["intrinsic"], golden["ply_element_intrinsic"])


# --- values -----------------------------------------------------------------------------------


def test_vertex_rows_encode_the_reference_formulas() -> None:
    g = random_gaussians(1000)
    rows = vertex_rows(g).double()
    c = g.colors.double()
    srgb = torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)
    o = g.opacities.double()
    expected = torch.cat(
        [g.means.double(), (srgb - 0.5) / SH_C0, torch.log(o / (1 - o))[:, None]]
        + [g.scales.double().log(), g.quaternions.double()],
        dim=1,
    )
    torch.testing.assert_close(rows, expected, atol=2e-5, rtol=1e-5)


def test_srgb_encoding_at_known_points() -> None:
    colors = torch.tensor([[0.0, 0.0031308, 1.0], [0.5, 0.001, 0.18]])
    g = random_gaussians(2)
    g = Gaussians(g.means, g.scales, g.quaternions, colors, g.opacities)
    srgb = vertex_rows(g)[:, 3:6] * SH_C0 + 0.5
    expected = torch.tensor([[0.0, 0.04045, 1.0], [0.735357, 0.01292, 0.461356]])
    torch.testing.assert_close(srgb, expected, atol=2e-6, rtol=0)


def test_round_trip() -> None:
    g = random_gaussians(10_000)
    back = read_ply(write_ply(g, **CAMERA)).gaussians
    assert torch.equal(back.means, g.means)
    torch.testing.assert_close(back.scales, g.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(back.quaternions, g.quaternions)
    torch.testing.assert_close(back.colors, g.colors, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.opacities, g.opacities, atol=1e-6, rtol=0)


def test_extreme_values_stay_finite() -> None:
    g = random_gaussians(4)
    g = Gaussians(
        means=g.means,
        scales=torch.tensor([[0.0, 1e-30, 1.0]]).expand(4, 3),
        quaternions=g.quaternions * 7,  # any length: rows hold unit quaternions
        colors=g.colors,
        opacities=torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9]),
    )
    rows = vertex_rows(g)
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows[:, 10:].norm(dim=-1), torch.ones(4))
    back = read_ply(write_ply(g, **CAMERA)).gaussians
    torch.testing.assert_close(back.opacities, g.opacities, atol=2 * OPACITY_EPS, rtol=0)


def test_disparity_element_is_torch_quantile() -> None:
    for n, seed in ((1, 0), (2, 1), (11, 2), (1000, 3), (123_457, 4)):
        g = random_gaussians(n, seed)
        disparity = read_ply(write_ply(g, **CAMERA, layout="sharp")).elements["disparity"]
        expected = torch.quantile(1 / g.means[:, 2], torch.tensor([0.1, 0.9]))
        assert torch.equal(torch.from_numpy(disparity.copy()), expected), n


def test_sharp_layout_needs_a_gaussian() -> None:
    with pytest.raises(ValueError):
        write_ply(random_gaussians(0), **CAMERA, layout="sharp")
    assert len(read_ply(write_ply(random_gaussians(0), **CAMERA)).gaussians) == 0


def test_unknown_layout() -> None:
    with pytest.raises(ValueError):
        write_ply(random_gaussians(1), **CAMERA, layout="other")  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["standard", "sharp"])
def test_save_ply_writes_the_same_bytes(tmp_path: Path, layout: str) -> None:
    g = random_gaussians(1000)
    save_ply(tmp_path / "splat.ply", g, **CAMERA, layout=layout)
    assert (tmp_path / "splat.ply").read_bytes() == write_ply(g, **CAMERA, layout=layout)


def test_standard_layout_has_only_vertices() -> None:
    data = write_ply(random_gaussians(100), **CAMERA)
    header = data[: data.index(b"end_header\n") + len(b"end_header\n")]
    assert header.count(b"element") == 1
    assert len(data) == len(header) + 56 * 100
    assert read_ply(data).elements == {}


# --- independent readers ----------------------------------------------------------------------

# antimatter15/splat's processPlyBuffer: every "property" line of the header, whatever element
# it belongs to, adds its size to one row stride; rows start right after end_header.
SPLAT_VIEWER_SIZES = {"double": 8, "int": 4, "uint": 4, "float": 4, "short": 2, "ushort": 2}
SPLAT_VIEWER_SIZES["uchar"] = 1


def splat_viewer_rows(data: bytes, rows: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """(row stride, property -> values of the first `rows` vertices) as antimatter15's splat
    viewer reads a .ply. Reading past the end raises, like its DataView."""
    end = data.index(b"end_header\n")
    header = data[:end].decode()
    count = int(re.search(r"element vertex (\d+)\n", header).group(1))
    stride, offsets = 0, {}
    for line in header.split("\n"):
        if line.startswith("property "):
            _, kind, name = line.split(" ")
            offsets[name] = stride
            stride += SPLAT_VIEWER_SIZES.get(kind, 1)
    body = data[end + len(b"end_header\n") :]
    values = {
        name: np.array(
            [
                struct.unpack_from("<f", body, row * stride + offsets[name])[0]
                for row in range(count if rows is None else rows)
            ]
        )
        for name in VERTEX_PROPERTIES
    }
    return stride, values


def test_splat_viewer_reads_the_standard_layout() -> None:
    g = random_gaussians(200)
    stride, values = splat_viewer_rows(write_ply(g, **CAMERA))
    assert stride == 56
    np.testing.assert_array_equal(
        np.stack([values[n] for n in VERTEX_PROPERTIES], 1), vertex_rows(g)
    )
    # The viewer's own decoding, as in its shader inputs.
    np.testing.assert_allclose(np.exp(values["scale_0"]), g.scales[:, 0], rtol=1e-6)
    opacity = 1 / (1 + np.exp(-values["opacity"]))
    np.testing.assert_allclose(opacity, g.opacities, atol=1e-6)
    srgb_red = 0.5 + SH_C0 * values["f_dc_0"]
    np.testing.assert_allclose(srgb_red, read_ply_srgb_red(g), atol=1e-6)


def read_ply_srgb_red(g: Gaussians) -> np.ndarray:
    c = g.colors[:, 0].double().numpy()
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def test_splat_viewer_misreads_the_sharp_layout() -> None:
    """Why "standard" is the default: the metadata elements' 7 properties (22 bytes) join the
    vertex stride, so every row after the first is read from the wrong place, and reading the
    last rows runs past the end of the file."""
    g = random_gaussians(200)
    data = write_ply(g, **CAMERA, layout="sharp")
    stride, values = splat_viewer_rows(data, rows=100)
    assert stride == 56 + 5 * 4 + 2 * 1
    read = np.stack([values[n] for n in VERTEX_PROPERTIES], 1)
    rows = vertex_rows(g).numpy()[:100]
    np.testing.assert_array_equal(read[0], rows[0])
    assert not np.isclose(read[1:], rows[1:]).all(axis=1).any()
    with pytest.raises(struct.error):
        splat_viewer_rows(data)


@pytest.mark.parametrize("layout", ["standard", "sharp"])
def test_plyfile_reads_both_layouts(layout: str) -> None:
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(500)
    data = write_ply(g, **CAMERA, layout=layout)
    ply = plyfile.PlyData.read(io.BytesIO(data))
    vertex = ply["vertex"].data
    rows = vertex_rows(g).numpy()
    for i, name in enumerate(VERTEX_PROPERTIES):
        np.testing.assert_array_equal(vertex[name], rows[:, i])
    others = {e.name: e.data[e.name] for e in ply.elements if e.name != "vertex"}
    ours = read_ply(data).elements
    assert list(others) == list(ours)
    for name, values in others.items():
        np.testing.assert_array_equal(values, ours[name])
    if layout == "sharp":
        f, w, h = CAMERA["focal_length_px"], CAMERA["image_width"], CAMERA["image_height"]
        np.testing.assert_allclose(others["intrinsic"], [f, 0, w / 2, 0, f, h / 2, 0, 0, 1])
        np.testing.assert_array_equal(others["image_size"], [w, h])
        np.testing.assert_array_equal(others["frame"], [1, 500])
        np.testing.assert_array_equal(others["extrinsic"], np.eye(4).ravel())
        np.testing.assert_array_equal(others["version"], [1, 5, 0])
        np.testing.assert_array_equal(others["color_space"], [0])


# --- strict reader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.replace(b"binary_little_endian", b"binary_big_endian"),
        lambda d: d.replace(b"ply\n", b"plx\n", 1),
        lambda d: d.replace(b"property float x", b"property list uchar int x"),
        lambda d: d.replace(b"property float x", b"property float32 x"),
        lambda d: d.replace(b"property float rot_3\n", b""),
        lambda d: d.replace(b"property float y", b"property float x"),
        lambda d: d.replace(b"end_header", b"element vertex 0\nend_header"),
        lambda d: d[:-1],
        lambda d: d + b"\0",
    ],
    ids=[
        "big_endian",
        "magic",
        "list",
        "type_name",
        "missing_property",
        "duplicate_property",
        "duplicate_element",
        "truncated",
        "trailing",
    ],
)
def test_reader_rejects(corrupt) -> None:
    data = write_ply(random_gaussians(3), **CAMERA)
    read_ply(data)
    with pytest.raises(ValueError):
        read_ply(corrupt(data))


def test_reader_skips_comments_and_decodes_linear_color_space() -> None:
    g = random_gaussians(5)
    data = write_ply(g, **CAMERA, layout="sharp")
    data = data.replace(
        b"format binary_little_endian 1.0\n", b"format binary_little_endian 1.0\ncomment hi\n"
    )
    assert torch.equal(read_ply(data).gaussians.means, g.means)
    linear = bytearray(data)
    linear[-4] = 1  # color_space: the byte before version's three
    colors = read_ply(bytes(linear)).gaussians.colors
    torch.testing.assert_close(colors, vertex_rows(g)[:, 3:6] * SH_C0 + 0.5)
    assert not math.isclose(float(colors[0, 0]), float(g.colors[0, 0]), abs_tol=1e-3)
