"""Tests for engine.splats.formats.sog on the real pipeline's output, and for `sharp-runpod convert`.

The tiny untrained model on samples/coffee.jpg gives a real Prediction: 2 x 768 x 768 strided
Gaussians (column views of the network's output), the stacked-grid layout; pruned to 5,000 it
takes the near-square path. read_sog decodes by the specification's formulas, independently of
the writer, and every round-trip bound below comes from the quantization the file declares:

  positions  16-bit symmetric log: step = (maxs - mins) / 65535, one width for all axes;
             |p' - p| <= (1 + |p|) step / 2 (1 + step)
  rotations  smallest three in 8 bits of c sqrt2 / 2 + 1/2: each stored component within
             e = 1 / (255 sqrt2) = 2.8e-3, the rebuilt largest (>= 1/2) within 3e (1 + 2%),
             1 - |<q, q'>| <= 6 e^2 = 4.6e-5
  scales     |ln s' - ln s| <= half the largest gap of meta.scales.codebook
  colours    |sh0' - sh0| <= half the largest gap of meta.sh0.codebook, sRGB within SH_C0 times it
  opacity    0.5 / 255
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.splats.formats.sog_precision as precision
from engine.io.checkpoint import TINY_UNTRAINED
from engine.io.images import decode_image
from engine.network.color import linear_to_srgb
from engine.runtime.predictor import Prediction, SharpPredictor
from engine.splats.formats import FORMATS, encode
from engine.splats.formats.common import SH_C0
from engine.splats.formats.ply import read_ply
from engine.splats.formats.sog import (
    EFFORTS,
    MAX_LEVEL,
    SHARP_GRID,
    texture_size,
    write_sog,
)
from engine.splats.formats.sog_budget import SogBudgetError, write_sog_within
from engine.splats.formats.sog_reader import read_sog, read_sog_files
from engine.splats.formats.splat import read_splat
from engine.splats.formats.spz import read_spz
from engine.splats.gaussians import Gaussians
from engine.splats.pruning import prune
from tests import gaussian_data

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coffee.jpg"
CLI = Path(sys.executable).parent / "sharp-runpod"
IMAGES = ("means_l.webp", "means_u.webp", "scales.webp", "quats.webp", "sh0.webp")
E = 1 / (255 * math.sqrt(2))  # half a step of a stored quaternion component
SLACK = 2e-6  # float32 arithmetic on values of order 1


@pytest.fixture(scope="module")
def prediction() -> Prediction:
    predictor = SharpPredictor.from_checkpoint(TINY_UNTRAINED, "cpu")
    return predictor.predict(decode_image(SAMPLE.read_bytes()))


@pytest.fixture(scope="module", params=["unpruned", "pruned"])
def case(request, prediction: Prediction) -> tuple[Gaussians, bytes]:
    g = prediction.gaussians
    if request.param == "pruned":
        g = prune(g, max_gaussians=5000, focal_length_px=prediction.focal_length_px)
    return g, write_sog(g, level=None)


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def assert_below(name: str, error: np.ndarray, bound: np.ndarray | float) -> None:
    excess = error - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, f"{name}: error {error[worst]:.3g} over bound at {worst}"


def half_largest_gap(codebook: list[float]) -> float:
    return float(np.diff(np.asarray(codebook)).max()) / 2


def test_archive_is_stored_zip_of_meta_and_five_webps(case) -> None:
    _, data = case
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == ["meta.json", *IMAGES]
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert archive.testzip() is None  # every CRC matches
        for name in IMAGES:
            assert archive.read(name)[:4] == b"RIFF" and archive.read(name)[8:16] == b"WEBPVP8L"


def test_meta_json_fields(case) -> None:
    g, data = case
    meta, _ = read_sog_files(data)
    assert set(meta) == {"version", "asset", "count", "means", "scales", "quats", "sh0"}
    assert meta["version"] == 2 and meta["count"] == len(g)
    assert meta["asset"]["generator"].startswith("sharp-runpod")
    assert meta["means"]["files"] == ["means_l.webp", "means_u.webp"]
    assert meta["scales"]["files"] == ["scales.webp"] and meta["quats"] == {"files": ["quats.webp"]}
    assert meta["sh0"]["files"] == ["sh0.webp"]
    # mins are the per-axis minima of sign(p) ln(1 + |p|); the axes share the widest range.
    means = host(g.means)
    logs = np.sign(means) * np.log1p(np.abs(means))
    np.testing.assert_allclose(meta["means"]["mins"], logs.min(axis=0), atol=1e-6)
    widths = np.subtract(meta["means"]["maxs"], meta["means"]["mins"])
    np.testing.assert_allclose(widths, np.ptp(logs, axis=0).max(), rtol=1e-6)
    # Codebooks: 256 ascending entries spanning the data exactly.
    log_scales = np.log(host(g.scales))
    sh0 = (host(linear_to_srgb(g.colors)) - 0.5) / SH_C0
    for key, values in (("scales", log_scales), ("sh0", sh0)):
        book = np.asarray(meta[key]["codebook"])
        assert len(book) == 256 and np.all(np.diff(book) >= 0), key
        np.testing.assert_allclose([book[0], book[-1]], [values.min(), values.max()], atol=1e-6)


def test_texture_size_and_texel_order(case) -> None:
    g, data = case
    _, images = read_sog_files(data)
    n = len(g)
    if n == math.prod(SHARP_GRID):
        width, height = 768, 1536  # the two 768 x 768 layers stacked
    else:
        width = math.ceil(math.sqrt(n) / 4) * 4
        height = math.ceil(n / width)
    assert (width, height) == texture_size(n)
    assert {image.shape for image in images.values()} == {(height, width, 4)}
    # Texel (x, y) is Gaussian x + y * width: its opacity byte, read at coordinates.
    alpha = np.rint(g.opacities.float().numpy() * np.float32(255))
    rng = np.random.default_rng(0)
    for i in rng.integers(0, n, 50):
        assert images["sh0.webp"][i // width, i % width, 3] == alpha[i]
    # Texels past count repeat the last Gaussian, and RGB-only images have alpha 255.
    flat = {name: image.reshape(-1, 4) for name, image in images.items()}
    for name, texels in flat.items():
        assert np.all(texels[n:] == texels[n - 1]), name
    for name in ("means_l.webp", "means_u.webp", "scales.webp"):
        assert np.all(flat[name][:, 3] == 255), name
    assert set(np.unique(flat["quats.webp"][:, 3])) <= {252, 253, 254, 255}


def test_round_trip_within_the_declared_quantization(case) -> None:
    g, data = case
    meta, images = read_sog_files(data)
    decoded = read_sog(data)
    assert len(decoded) == len(g)

    step = (np.asarray(meta["means"]["maxs"]) - np.asarray(meta["means"]["mins"])) / 65535
    assert step.max() < 3e-5  # 16 bits over this scene's width: the bound below is tight
    means = host(g.means)
    bound = (1 + np.abs(means)) * step / 2 * (1 + step) + SLACK
    assert_below("positions", np.abs(host(decoded.means) - means), bound)

    q = host(g.quaternions)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q_decoded = host(decoded.quaternions)
    np.testing.assert_allclose(np.linalg.norm(q_decoded, axis=1), 1, atol=1e-6)
    dropped = images["quats.webp"].reshape(-1, 4)[: len(g), 3].astype(int) - 252
    # The largest |component| (or one within float32 rounding of it) is the one dropped.
    largest = np.take_along_axis(np.abs(q), dropped[:, None], 1)[:, 0]
    assert_below("dropped component below the largest", np.abs(q).max(axis=1) - largest, 1e-6)
    # The file's sign: the dropped (largest) component is positive.
    q *= np.where(np.take_along_axis(q, dropped[:, None], 1) < 0, -1, 1)
    error = np.abs(q_decoded - q)
    is_dropped = np.arange(4) == dropped[:, None]
    assert_below("stored quaternion components", error[~is_dropped], E + SLACK)
    assert_below("rebuilt largest components", error[is_dropped], 3 * E * 1.02 + SLACK)
    alignment = np.abs((q * q_decoded).sum(axis=1))
    assert_below("1 - |<q, q'>|", 1 - alignment, 6 * E * E + SLACK)

    scale_bound = half_largest_gap(meta["scales"]["codebook"])
    assert scale_bound < 0.05  # the codebook covers the data densely enough to matter
    log_error = np.abs(np.log(host(decoded.scales)) - np.log(host(g.scales)))
    assert_below("log scales", log_error, scale_bound + SLACK)

    sh0_bound = half_largest_gap(meta["sh0"]["codebook"])
    assert sh0_bound < 0.05
    srgb_error = np.abs(host(linear_to_srgb(decoded.colors)) - host(linear_to_srgb(g.colors)))
    assert_below("sRGB colours", srgb_error, SH_C0 * sh0_bound + 1e-5)

    opacity_error = np.abs(host(decoded.opacities) - host(g.opacities))
    assert_below("opacities", opacity_error, 0.5 / 255 + SLACK)


def test_same_input_gives_the_same_bytes_whatever_the_memory_layout(prediction) -> None:
    g = prediction.gaussians
    assert not g.means.is_contiguous()  # the pipeline's own strided views
    contiguous = Gaussians(
        *(t.contiguous() for t in (g.means, g.scales, g.quaternions, g.colors, g.opacities))
    )
    # Another layout again: every other row of a tensor twice as long.
    doubled = Gaussians(
        *(
            t.repeat_interleave(2, dim=0)[::2]
            for t in (g.means, g.scales, g.quaternions, g.colors, g.opacities)
        )
    )
    first = write_sog(g)
    assert write_sog(g) == first
    assert write_sog(contiguous) == first
    assert write_sog(doubled) == first
    assert write_sog(doubled, level=None) == write_sog(g, level=None)


@pytest.mark.parametrize("level", [0, 2])
def test_precision_levels_hold_every_gaussian_to_its_tolerance(prediction, level) -> None:
    """Each attribute within what sog_precision promises, Gaussian by Gaussian."""
    g, f = prediction.gaussians, prediction.focal_length_px
    data = write_sog(g, level=level, focal_length_px=f)
    meta, _ = read_sog_files(data)
    assert f"precision level {level}" in meta["asset"]["generator"]
    decoded = read_sog(data)
    tolerance = host(precision.spatial_tolerance(g.contiguous(), focal_length_px=f, level=level))
    means = host(g.means)
    step = (np.asarray(meta["means"]["maxs"]) - np.asarray(meta["means"]["mins"])) / 65535
    # at least the container's own half step; float32 arithmetic on top
    bound = np.maximum(tolerance[:, None], (1 + np.abs(means)) * step / 2) * (1 + 1e-3) + SLACK
    assert_below("positions", np.abs(host(decoded.means) - means), bound)
    scales = host(g.scales)
    log_error = np.abs(np.log(host(decoded.scales)) - np.log(scales))
    scale_bound = np.maximum(
        tolerance[:, None] / (2 * scales), half_largest_gap(meta["scales"]["codebook"])
    )
    assert_below("log scales", log_error, scale_bound + SLACK)
    # rotations: the surface at 2 sigma moves by at most the tolerance (plus the container's step)
    q = host(g.quaternions)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    angle = 2 * np.arccos(np.clip(np.abs((q * host(decoded.quaternions)).sum(axis=1)), 0, 1))
    spread = scales.max(axis=1) - scales.min(axis=1)
    assert_below("rotation x spread", 2 * angle * spread, tolerance + 2 * 12 * E * spread + SLACK)
    opacity_error = np.abs(host(decoded.opacities) - host(g.opacities))
    assert_below("opacities", opacity_error, 0.5 / 255 + SLACK)
    srgb_error = np.abs(host(linear_to_srgb(decoded.colors)) - host(linear_to_srgb(g.colors)))
    allowed = precision.COLOR_TOLERANCE * 2**level / np.maximum(host(g.opacities), 1 / 16)
    colour_bound = np.maximum(allowed, SH_C0 * half_largest_gap(meta["sh0"]["codebook"]))
    assert_below("sRGB colours", srgb_error, colour_bound[:, None] + 1e-5)
    if level:  # coarser precision, fewer bytes
        assert len(data) < len(write_sog(g, level=0, focal_length_px=f))


def test_budget_steps_down_then_prunes_only_when_allowed(prediction) -> None:
    g, f = prediction.gaussians, prediction.focal_length_px
    sizes = [len(write_sog(g, level=level, focal_length_px=f)) for level in (0, 1)]
    fit = write_sog_within(g, max_bytes=sizes[0] - 1, focal_length_px=f, allow_pruning=False)
    assert (fit.level, fit.num_gaussians, len(fit.data)) == (1, len(g), sizes[1])
    assert fit.summary()["precision_level"] == 1 and not fit.summary()["pruned_to_fit"]
    coarsest = len(write_sog(g, level=MAX_LEVEL, focal_length_px=f))
    budget = coarsest // 2
    with pytest.raises(SogBudgetError, match="prune_to_fit"):
        write_sog_within(g, max_bytes=budget, focal_length_px=f, allow_pruning=False)
    fit = write_sog_within(g, max_bytes=budget, focal_length_px=f, allow_pruning=True)
    assert len(fit.data) <= budget and fit.pruned_to_fit and fit.level == MAX_LEVEL
    assert len(read_sog(fit.data)) == fit.num_gaussians < len(g)
    # just enough: within a few percent of the budget, and of the Gaussians that would fit
    assert len(fit.data) > 0.85 * budget


def test_the_one_transfer_path_of_a_gpu_writes_the_same_bytes(prediction, monkeypatch) -> None:
    """Off the CPU, every image and meta value comes to the host in one copy of their bytes."""
    from engine.splats.formats import sog

    g = prune(prediction.gaussians, max_gaussians=3000, focal_length_px=1000.0)
    first = write_sog(g)
    copies = []
    to_host = sog._to_host
    monkeypatch.setattr(sog, "_on_host", lambda device: False)
    monkeypatch.setattr(
        sog, "_to_host", lambda values: copies.append(set(values)) or to_host(values)
    )
    assert write_sog(g) == first
    images = {"means_l", "means_u", "quats", "scales", "sh0"}
    assert copies == [images | {"mins", "maxs", "scales_codebook", "sh0_codebook"}]


def test_efforts_decode_alike_and_trade_time_for_size(prediction) -> None:
    g = prune(prediction.gaussians, max_gaussians=20_000, focal_length_px=1000.0)
    files = {effort: write_sog(g, effort=effort) for effort in (0, 1, 2)}
    decoded = {effort: read_sog(data) for effort, data in files.items()}
    for effort in (1, 2):  # lossless WebP: every effort holds the same texels
        for name in ("means", "scales", "quaternions", "colors", "opacities"):
            assert torch.equal(getattr(decoded[effort], name), getattr(decoded[0], name)), name
    assert len(files[2]) < len(files[0])
    assert sorted(EFFORTS) == list(range(6))


def test_grid_argument_and_the_automatic_layouts() -> None:
    assert texture_size(2 * 768 * 768) == (768, 1536)
    assert texture_size(24, (2, 3, 4)) == (4, 6)
    assert texture_size(1) == (4, 1)
    assert texture_size(17) == (8, 3)
    assert texture_size(1_179_647) == (1088, 1085)
    with pytest.raises(ValueError, match="does not hold"):
        texture_size(25, (2, 3, 4))
    with pytest.raises(ValueError, match="exceeds"):
        texture_size(20_000, (1, 1, 20_000))
    g = tiny_gaussians(24)
    meta, images = read_sog_files(write_sog(g, grid=(2, 3, 4)))
    assert images["sh0.webp"].shape == (6, 4, 4) and meta["count"] == 24


tiny_gaussians = partial(gaussian_data.random_gaussians, spread=3.0, log_scales=(-6.0, -2.0))


def test_single_gaussian_and_zero_quaternion() -> None:
    g = tiny_gaussians(1)
    g = Gaussians(g.means, g.scales, torch.zeros(1, 4), g.colors, g.opacities)
    decoded = read_sog(write_sog(g, level=None))
    # One value per range: decoded exactly (mins == maxs, codebooks of one value).
    np.testing.assert_allclose(host(decoded.means), host(g.means), rtol=1e-6)
    np.testing.assert_allclose(host(decoded.scales), host(g.scales), rtol=1e-5)
    # A zero quaternion is stored as the identity.
    np.testing.assert_allclose(host(decoded.quaternions), [[1, 0, 0, 0]], atol=E + SLACK)


def test_refuses_zero_gaussians_bad_efforts_and_non_finite_values() -> None:
    with pytest.raises(ValueError, match="zero Gaussians"):
        write_sog(tiny_gaussians(0))
    with pytest.raises(ValueError, match="effort"):
        write_sog(tiny_gaussians(4), effort=6)
    with pytest.raises(ValueError, match="precision level"):
        write_sog(tiny_gaussians(4), level=MAX_LEVEL + 1)
    g = tiny_gaussians(4)
    g.means[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        write_sog(g)


def test_reader_rejects_malformed_files() -> None:
    with pytest.raises(ValueError, match="ZIP"):
        read_sog(b"not a zip")
    good = write_sog(tiny_gaussians(10))
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}

    def rezip(**changes: bytes | None) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in {**members, **changes}.items():
                if data is not None:
                    archive.writestr(name, data)
        return buffer.getvalue()

    meta = json.loads(members["meta.json"])
    with pytest.raises(ValueError, match="version"):
        read_sog(rezip(**{"meta.json": json.dumps({**meta, "version": 1}).encode()}))
    with pytest.raises(ValueError, match="lacks quats.webp"):
        read_sog(rezip(**{"quats.webp": None}))
    with pytest.raises(ValueError, match="count"):
        read_sog(rezip(**{"meta.json": json.dumps({**meta, "count": 17}).encode()}))
    with pytest.raises(ValueError, match="no meta.json"):
        read_sog(rezip(**{"meta.json": None}))
    with pytest.raises(ValueError, match="malformed meta.json"):
        read_sog(rezip(**{"meta.json": json.dumps({**meta, "quats": {}}).encode()}))
    with pytest.raises(ValueError, match="sh0.webp is not a readable image"):
        read_sog(rezip(**{"sh0.webp": b"RIFF...."}))
    # A deflated archive is still a SOG to the readers (they inflate); ours reads it too.
    assert len(read_sog(rezip())) == 10


def test_encode_registry_knows_sog(prediction) -> None:
    assert "sog" in FORMATS
    encoded = encode(
        prediction.gaussians,
        "sog",
        image_width=prediction.image_width,
        image_height=prediction.image_height,
        focal_length_px=prediction.focal_length_px,
    )
    assert encoded.extension == ".sog" and encoded.media_type == "application/octet-stream"
    assert encoded.data == write_sog(
        prediction.gaussians, focal_length_px=prediction.focal_length_px
    )


# --- sharp-runpod convert ---------------------------------------------------------------------


def run_convert(*args: str) -> subprocess.CompletedProcess:
    if not CLI.exists():
        pytest.fail(f"console script not installed at {CLI}: run `pip install -e .`")
    return subprocess.run(
        [str(CLI), "convert", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def pipeline_ply(prediction, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "coffee.ply"
    path.write_bytes(
        encode(
            prediction.gaussians,
            "ply",
            image_width=prediction.image_width,
            image_height=prediction.image_height,
            focal_length_px=prediction.focal_length_px,
        ).data
    )
    return path


READERS = {
    "ply": lambda data: read_ply(data).gaussians,
    "spz": read_spz,
    "splat": read_splat,
    "sog": read_sog,
}


@pytest.mark.parametrize("target", FORMATS)
def test_convert_a_pipeline_ply_to_every_format(target, pipeline_ply, prediction, tmp_path):
    output = tmp_path / "out" / f"coffee.{target}"
    done = run_convert(str(pipeline_ply), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert f"1,179,648 Gaussians -> {output}" in done.stdout
    data = output.read_bytes()
    assert len(READERS[target](data)) == len(prediction.gaussians)
    if target == "sog":  # the same bytes as writing the prediction directly
        assert data == write_sog(read_ply(pipeline_ply.read_bytes()).gaussians)
        assert texture_size(len(prediction.gaussians)) == (768, 1536)


def test_convert_reads_the_sharp_layout(prediction, tmp_path):
    from engine.cli import build_parser

    camera = {
        "image_width": prediction.image_width,
        "image_height": prediction.image_height,
        "focal_length_px": prediction.focal_length_px,
    }
    g = prune(prediction.gaussians, max_gaussians=2000, focal_length_px=1000.0)
    source = tmp_path / "sharp.ply"
    source.write_bytes(encode(g, "ply", **camera, ply_layout="sharp").data)
    args = build_parser().parse_args(["convert", str(source), "-o", str(tmp_path / "s.sog")])
    assert args.run(args) == 0
    standard = read_ply(encode(g, "ply", **camera).data).gaussians
    assert (tmp_path / "s.sog").read_bytes() == write_sog(standard)


def test_convert_a_generic_3dgs_ply_with_higher_order_sh(tmp_path):
    """A 3DGS training .ply: normals, 45 f_rest, logit opacities, log scales, raw quaternions."""
    plyfile = pytest.importorskip("plyfile")
    g = tiny_gaussians(300)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(45)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    rows = np.zeros(len(g), [(name, "<f4") for name in names])
    for i, axis in enumerate("xyz"):
        rows[axis] = host(g.means)[:, i]
        rows[f"scale_{i}"] = np.log(host(g.scales)[:, i])
    srgb = host(linear_to_srgb(g.colors))
    for i in range(3):
        rows[f"f_dc_{i}"] = (srgb[:, i] - 0.5) / SH_C0
    rows["opacity"] = host(torch.logit(g.opacities))
    for i in range(4):
        rows[f"rot_{i}"] = host(g.quaternions)[:, i] * 2.5  # not unit length
    source = tmp_path / "trained.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(rows, "vertex")]).write(str(source))

    done = run_convert(str(source), "-o", str(tmp_path / "trained.sog"))
    assert done.returncode == 0, done.stderr
    assert "higher-order spherical harmonics" in done.stderr
    decoded = read_sog((tmp_path / "trained.sog").read_bytes())
    assert len(decoded) == 300
    meta, _ = read_sog_files((tmp_path / "trained.sog").read_bytes())
    step = (meta["means"]["maxs"][0] - meta["means"]["mins"][0]) / 65535
    # No camera in a converted file: each position is held to a fraction of its Gaussian's size.
    tolerance = host(precision.spatial_tolerance(g, focal_length_px=None, level=0))
    means = host(g.means)
    bound = np.maximum(tolerance[:, None], (1 + np.abs(means)) * step / 2) * (1 + 1e-3) + SLACK
    assert_below("positions", np.abs(host(decoded.means) - means), bound)
    assert_below("opacities", np.abs(host(decoded.opacities) - host(g.opacities)), 0.5 / 255 + 1e-5)


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["missing.ply", "-o", "x.sog"], 2, "no such file"),
        (["in.ply", "-o", "x.txt"], 2, "-o must end in"),
        (["in.obj", "-o", "x.sog"], 2, "the input must end in"),
        (["in.ply", "-o", "in.ply"], 2, "overwrite the input"),
        (["in.ply", "-o", "x.sog"], 1, "conversion failed: not a .ply"),
        (["in.sog", "-o", "x.ply"], 1, "conversion failed: not a .sog"),
        (["in.spz", "-o", "x.ply"], 1, "conversion failed: not an .spz"),
    ],
)
def test_convert_reports_bad_input(arguments, code, message, tmp_path, monkeypatch, caplog):
    from engine.cli import build_parser

    for name in ("in.ply", "in.obj", "in.sog", "in.spz"):
        (tmp_path / name).write_bytes(b"garbage")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["convert", *arguments])
    assert args.run(args) == code  # an error code, not an exception
    assert message in caplog.text
    assert not (tmp_path / "x.sog").exists() and not (tmp_path / "x.ply").exists()


def test_convert_without_output_is_a_usage_error(capsys):
    from engine.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["convert", "in.ply"])
    assert exit.value.code == 2 and "-o/--output" in capsys.readouterr().err
