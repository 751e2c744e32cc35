"""Tests for engine.splats.formats: .spz and .splat bytes against their specifications, round trips
within each format's quantization, axis conventions, determinism and the `encode` registry.

Quantization each round trip allows (half a step, plus float32 rounding):
  .spz positions     2^-13 m          (24-bit fixed point, 12 fraction bits)
  .spz ln(scale)     1/32             (steps of 1/16)
  .spz alpha         0.5/255
  .spz sRGB colour   0.5 * SH_C0 / (0.15 * 255) = 0.0037
  .spz rotation v3+  0.5 * sqrt(1/2) / 511 = 6.9e-4 per stored component; the largest, rebuilt
                     from the others (it is >= 1/2), 3 * sqrt(1/2) * 6.9e-4 / (1/2) = 2.9e-3
  .spz rotation v2   0.5 / 127.5 = 3.9e-3 on x, y, z (w >= 0); w = sqrt(1 - |xyz|^2) as decoded
  .splat             positions and scales exact (float32); sRGB and alpha 0.5/255; rotation
                     components 0.5/128, and 1/128 where +1 saturates at byte 255
"""

from __future__ import annotations

import gzip
import math
import struct
import sys
from functools import partial

import numpy as np
import pytest
import torch

from engine.network.color import linear_to_srgb
from engine.splats.formats import FORMATS, EncodedSplat, encode
from engine.splats.formats.common import SH_C0
from engine.splats.formats.splat import read_splat, write_splat
from engine.splats.formats.spz import (
    FRACTIONAL_BITS,
    MAGIC,
    SpzHeader,
    rdf_to_rub,
    read_spz,
    read_spz_streams,
    rub_to_rdf,
    write_spz,
)
from engine.splats.gaussians import Gaussians
from tests import gaussian_data

CAMERA = {"image_width": 640, "image_height": 480, "focal_length_px": 500.0}
EPS = 1e-6


# ln(scale) in [-9, 5]: inside .spz's range [-10, 5.94].
random_gaussians = partial(
    gaussian_data.random_gaussians, spread=5.0, log_scales=(-9.0, 5.0), quaternion_scale=3.0
)


def rotation_matrices(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = unit(q).unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def unit(q: torch.Tensor) -> torch.Tensor:
    return q / q.norm(dim=-1, keepdim=True)


def zstd_available() -> bool:
    try:
        from engine.splats.formats.spz import _zstd

        _zstd()
    except ImportError:
        return False
    return True


NEEDS_ZSTD = pytest.mark.skipif(not zstd_available(), reason="no zstd module")
SPZ_VERSIONS = [2, 3, pytest.param(4, marks=NEEDS_ZSTD)]


# ---------------------------------------------------------------------------------------------
# Axis conventions
# ---------------------------------------------------------------------------------------------


def test_rdf_to_rub_turns_down_into_up_and_forward_into_back() -> None:
    means = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    rub, _ = rdf_to_rub(means, torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(3, 4))
    # +y in OpenCV is down: up is +y in RUB, so it becomes -y; forward +z becomes back -z.
    assert rub.tolist() == [[0.0, -1.0, 0.0], [0.0, 0.0, -2.0], [3.0, 0.0, 0.0]]


def test_rdf_to_rub_conjugates_rotations_and_is_an_involution() -> None:
    g = random_gaussians(100)
    means, quaternions = rdf_to_rub(g.means, g.quaternions)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    expected = flip @ rotation_matrices(g.quaternions) @ flip
    torch.testing.assert_close(rotation_matrices(quaternions), expected)
    # A Gaussian's offset d from its mean maps like a point: R d in RDF is F R F (F d) in RUB.
    d = torch.randn(100, 3)
    rotated = torch.einsum("nij,nj->ni", rotation_matrices(quaternions), d @ flip)
    torch.testing.assert_close(
        rotated, torch.einsum("nij,nj->ni", rotation_matrices(g.quaternions), d) @ flip
    )
    back_means, back_quaternions = rub_to_rdf(means, quaternions)
    assert torch.equal(back_means, g.means) and torch.equal(back_quaternions, g.quaternions)


def test_spz_file_stores_a_point_below_the_camera_at_negative_y() -> None:
    g = golden_gaussians()
    _, streams = read_spz_streams(write_spz(g))
    raw = np.frombuffer(streams["positions"], np.uint8).reshape(-1, 3, 3).astype(np.int32)
    fixed = raw[..., 0] | raw[..., 1] << 8 | raw[..., 2] << 16
    fixed = (fixed ^ 0x800000) - 0x800000
    # Golden Gaussian 0 sits at OpenCV (1, 0.5, 2): right, below and in front of the camera.
    assert (fixed[0] / 4096).tolist() == [1.0, -0.5, -2.0]
    assert read_spz(write_spz(g)).means[0].tolist() == [1.0, 0.5, 2.0]


# ---------------------------------------------------------------------------------------------
# .spz golden bytes, derived by hand from nianticlabs/spz load-spz.cc
# ---------------------------------------------------------------------------------------------


def golden_gaussians() -> Gaussians:
    e = math.e
    return Gaussians(
        means=torch.tensor(
            [[1.0, 0.5, 2.0], [1 / 8192, 1 / 8192, 0.0], [-3.0, 0.0, 0.25], [0.0, 0.0, 0.0]]
        ),
        scales=torch.tensor(
            [[1.0, 1 / e, 0.01], [e**-10, e**7, 1.0], [0.5, 2.0, 0.1], [1.0, 1.0, 1.0]]
        ),
        quaternions=torch.tensor(  # (w, x, y, z)
            [[0.5, 0.5, -0.5, 0.5], [2.0, 0.0, 0.0, 0.0], [0.0, -3.0, 0.0, 0.0], [0, 0, 0, -3.0]]
        ),
        colors=torch.tensor(  # linear RGB
            [[0.0, 1.0, 0.05], [1.0, 1.0, 1.0], [0.05, 0.0, 1.0], [0.0, 0.0, 0.0]]
        ),
        opacities=torch.tensor([1.0, 0.5, 0.0, 0.25]),
    )


# Positions: RDF (x, y, z) -> RUB (x, -y, -z), times 2^12, roundf (halves away from zero),
# 24-bit two's complement, little-endian.
GOLDEN_POSITIONS = bytes.fromhex(
    "001000"  # G0 x =  1.0    ->  4096 = 0x001000
    "00f8ff"  # G0 y = -0.5    -> -2048 = 0xfff800
    "00e0ff"  # G0 z = -2.0    -> -8192 = 0xffe000
    "010000"  # G1 x =  2^-13  ->  0.5 -> 1 (half away from zero)
    "ffffff"  # G1 y = -2^-13  -> -0.5 -> -1 = 0xffffff
    "000000"  # G1 z = -0.0    ->  0
    "00d0ff"  # G2 x = -3.0    -> -12288 = 0xffd000
    "000000"  # G2 y = -0.0    ->  0
    "00fcff"  # G2 z = -0.25   -> -1024 = 0xfffc00
    "000000000000000000"  # G3 at the origin
)
# Alphas: round(opacity * 255).
GOLDEN_ALPHAS = bytes.fromhex(
    "ff"  # 1.0  -> 255
    "80"  # 0.5  -> 127.5 -> 128
    "00"  # 0.0  -> 0
    "40"  # 0.25 -> 63.75 -> 64
)
# Colours: sRGB s = linear_to_srgb(c); sh0 = (s - 0.5) / SH_C0; byte = round(sh0 * 38.25 + 127.5).
#   c = 0    -> s = 0           -> sh0 = -1.77245 -> 59.70  -> 60  = 0x3c
#   c = 1    -> s = 0.99999994  -> sh0 =  1.77245 -> 195.30 -> 195 = 0xc3
#   c = 0.05 -> s = 0.247800    -> sh0 = -0.89402 -> 93.30  -> 93  = 0x5d
GOLDEN_COLORS = bytes.fromhex("3cc35d" "c3c3c3" "5d3cc3" "3c3c3c")  # fmt: skip
# Scales: round((ln(s) + 10) * 16), clamped to 0..255.
GOLDEN_SCALES = bytes.fromhex(
    "a0"  # 1.0      -> 10 * 16 = 160
    "90"  # e^-1     ->  9 * 16 = 144
    "56"  # 0.01     -> (10 - 4.60517) * 16 = 86.32 -> 86
    "00"  # e^-10    ->  0
    "ff"  # e^7      -> 17 * 16 = 272 -> clamped to 255
    "a0"  # 1.0      -> 160
    "95"  # 0.5      -> (10 - 0.693147) * 16 = 148.91 -> 149
    "ab"  # 2.0      -> (10 + 0.693147) * 16 = 171.09 -> 171
    "7b"  # 0.1      -> (10 - 2.302585) * 16 = 123.16 -> 123
    "a0a0a0"  # 1.0 x 3
)
# Rotations, version 3 ("smallest three"): normalize, RDF -> RUB negates y and z, order
# (x, y, z, w); i = index of the largest |c| (first of equals), negate all if it is negative;
# word = i << 30, then for the others in order: word = word << 10 | sign << 9 | magnitude,
# magnitude = floor(511 * |c| / sqrt(1/2) + 0.5); stored little-endian.
#   |c| = 0.5 -> floor(511 * 0.707107 + 0.5) = floor(361.83) = 361 = 0x169
GOLDEN_ROTATIONS_V3 = bytes.fromhex(
    # G0 (w, x, y, z) = (0.5, 0.5, -0.5, 0.5) -> RUB (x, y, z, w) = (0.5, 0.5, -0.5, 0.5):
    # i = 0 (x); y: 0x169, z: 0x200 | 0x169 = 0x369, w: 0x169
    # word = 0x169 << 20 | 0x369 << 10 | 0x169 = 0x169da569
    "69a59d16"
    # G1 (2, 0, 0, 0) -> unit (1, 0, 0, 0) -> (x, y, z, w) = (0, 0, 0, 1): i = 3, all zero
    # word = 3 << 30 = 0xc0000000
    "000000c0"
    # G2 (0, -3, 0, 0) -> (x, y, z, w) = (-1, 0, 0, 0): i = 0, negated, so each zero gets
    # sign = (0 < 0) xor 1 = 1: word = 0x200 << 20 | 0x200 << 10 | 0x200 = 0x20080200
    "00020820"
    # G3 (0, 0, 0, -3) -> z = -1, negated by RDF -> RUB: (0, 0, 1, 0): i = 2, rest zero
    # word = 2 << 30 = 0x80000000
    "00000080"
)
# Rotations, version 2: (x, y, z) of the unit quaternion with w >= 0, round(c * 127.5 + 127.5).
GOLDEN_ROTATIONS_V2 = bytes.fromhex(
    "bfbf40"  # G0 (0.5, 0.5, -0.5): 191.25 -> 191, 191, 63.75 -> 64
    "808080"  # G1 (0, 0, 0): 127.5 -> 128 (half away from zero)
    "008080"  # G2 (-1, 0, 0), w = 0 is not negative: 0, 128, 128
    "8080ff"  # G3 (0, 0, 1): 128, 128, 255
)


def legacy_header(version: int, num_points: int) -> bytes:
    return bytes.fromhex(
        "4e475350"  # magic 0x5053474e, "NGSP" in file order
        f"{version:02x}000000"  # version u32
        f"{num_points:02x}000000"  # numPoints u32
        "00"  # shDegree 0
        "0c"  # fractionalBits 12
        "00"  # flags: not antialiased, no extensions
        "00"  # reserved
    )


@pytest.mark.parametrize(
    ("version", "rotations"), [(3, GOLDEN_ROTATIONS_V3), (2, GOLDEN_ROTATIONS_V2)]
)
def test_spz_v2_v3_payload_matches_the_specification_byte_for_byte(
    version: int, rotations: bytes
) -> None:
    data = write_spz(golden_gaussians(), version=version)
    expected = (
        legacy_header(version, 4)
        + GOLDEN_POSITIONS
        + GOLDEN_ALPHAS
        + GOLDEN_COLORS
        + GOLDEN_SCALES
        + rotations
    )
    assert gzip.decompress(data) == expected


@NEEDS_ZSTD
def test_spz_v4_container_matches_the_specification() -> None:
    from engine.splats.formats.spz import _zstd

    data = write_spz(golden_gaussians(), version=4)
    assert data[:32] == bytes.fromhex(
        "4e475350"  # magic
        "04000000"  # version 4
        "04000000"  # numPoints 4
        "00"  # shDegree 0
        "0c"  # fractionalBits 12
        "00"  # flags
        "05"  # numStreams: positions, alphas, colors, scales, rotations (SH is empty)
        "20000000"  # tocByteOffset 32: no extensions
        "000000000000000000000000"  # reserved
    )
    blocks = [
        GOLDEN_POSITIONS,
        GOLDEN_ALPHAS,
        GOLDEN_COLORS,
        GOLDEN_SCALES,
        GOLDEN_ROTATIONS_V3,
    ]
    offset = 32 + 5 * 16
    for i, block in enumerate(blocks):
        compressed, uncompressed = struct.unpack_from("<QQ", data, 32 + 16 * i)
        assert uncompressed == len(block)
        assert _zstd().decompress(data[offset : offset + compressed]) == block
        offset += compressed
    assert offset == len(data)


@pytest.mark.parametrize("version", SPZ_VERSIONS)
def test_spz_header_fields(version: int) -> None:
    g = random_gaussians(123)
    data = write_spz(g, version=version)
    header, streams = read_spz_streams(data)
    assert header == SpzHeader(
        version=version, num_points=123, sh_degree=0, fractional_bits=FRACTIONAL_BITS, flags=0
    )
    if version < 4:
        assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\0\0\0\0"  # gzip, mtime 0
        payload = gzip.decompress(data)
        assert struct.unpack_from("<IIIBBBB", payload) == (MAGIC, version, 123, 0, 12, 0, 0)
        assert payload[:4] == b"NGSP"
        assert len(payload) == 16 + 123 * (9 + 1 + 3 + 3 + (4 if version == 3 else 3))
    else:
        assert data[:4] == b"NGSP"
        assert struct.unpack_from("<IIIBBBBI", data) == (MAGIC, 4, 123, 0, 12, 0, 5, 32)
        assert data[20:32] == bytes(12)
    assert [len(b) for b in streams.values()] == [
        123 * k for k in (9, 1, 3, 3, 4 if version >= 3 else 3)
    ]


# ---------------------------------------------------------------------------------------------
# .spz round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SPZ_VERSIONS)
def test_spz_round_trip_within_quantization(version: int) -> None:
    g = random_gaussians()
    back = read_spz(write_spz(g, version=version))

    assert (back.means - g.means).abs().max() <= 2**-13 + EPS
    assert (back.scales.log() - g.scales.log()).abs().max() <= 1 / 32 + 1e-5
    assert (back.opacities - g.opacities).abs().max() <= 0.5 / 255 + EPS
    srgb_step = SH_C0 / (0.15 * 255)
    srgb_error = linear_to_srgb(back.colors) - linear_to_srgb(g.colors)
    assert srgb_error.abs().max() <= 0.5 * srgb_step + 1e-5

    # Compare in RUB, where the file's components live; the sign of q is free.
    _, q = rdf_to_rub(g.means, unit(g.quaternions))
    _, decoded = rdf_to_rub(g.means, back.quaternions)
    q, decoded = q[:, [1, 2, 3, 0]], decoded[:, [1, 2, 3, 0]]  # (x, y, z, w)
    if version >= 3:
        largest = q.abs().argmax(dim=1, keepdim=True)
        q = q * torch.where(q.gather(1, largest) < 0, -1.0, 1.0)
        error = (decoded - q).abs()
        is_largest = torch.zeros_like(q, dtype=torch.bool).scatter_(1, largest, True)
        assert error[~is_largest].max() <= 0.5 * math.sqrt(0.5) / 511 + EPS
        assert error[is_largest].max() <= 3 * math.sqrt(0.5) * (0.5 * math.sqrt(0.5) / 511) / 0.5
        torch.testing.assert_close(back.quaternions.norm(dim=1), torch.ones(len(g)))
    else:
        q = q * torch.where(q[:, 3:] < 0, -1.0, 1.0)
        assert (decoded[:, :3] - q[:, :3]).abs().max() <= 0.5 / 127.5 + EPS
        rebuilt = (1 - decoded[:, :3].square().sum(dim=1)).clamp_min(0).sqrt()
        torch.testing.assert_close(decoded[:, 3], rebuilt)


def test_spz_clamps_positions_beyond_the_24_bit_range() -> None:
    g = random_gaussians(2)
    far = Gaussians(
        torch.tensor([[5000.0, -5000.0, 0.0], [-3000.0, 0.0, -3000.0]]), *g.tensors()[1:]
    )
    # Stored in RUB (y, z negated) within [-2^23, 2^23 - 1] / 4096 = [-2048, 2047.99976].
    limit = (2**23 - 1) / 4096
    expected = torch.tensor([[limit, -limit, 0.0], [-2048.0, 0.0, -limit]])
    assert torch.equal(read_spz(write_spz(far)).means, expected)


def test_spz_rejects_bad_arguments_and_bad_files() -> None:
    g = random_gaussians(10)
    with pytest.raises(ValueError, match="version"):
        write_spz(g, version=1)
    with pytest.raises(ValueError, match="zero Gaussians"):
        write_spz(g.index(torch.zeros(10, dtype=torch.bool)))
    with pytest.raises(ValueError, match="not an .spz"):
        read_spz(b"ply\nformat binary_little_endian 1.0\n")
    payload = gzip.decompress(write_spz(g))
    with pytest.raises(ValueError, match="needs"):
        read_spz(gzip.compress(payload[:-1]))
    version_1 = payload[:4] + b"\x01" + payload[5:]  # float16 positions, never released
    with pytest.raises(ValueError, match="version 1"):
        read_spz(gzip.compress(version_1))


def test_spz_without_isal_falls_back_to_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    g = random_gaussians()
    fast = write_spz(g)
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal now raises ImportError
    slow = write_spz(g)
    assert slow == write_spz(g)
    assert gzip.decompress(slow) == gzip.decompress(fast)


# ---------------------------------------------------------------------------------------------
# .spz against Niantic's own C++ (PyPI alspz vendors nianticlabs/spz), where installed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SPZ_VERSIONS)
def test_spz_matches_niantic_reference_encoder_and_decoder(version: int) -> None:
    alspz = pytest.importorskip("alspz")
    g = random_gaussians(20000)
    means, quaternions = rdf_to_rub(g.means, g.quaternions)
    srgb = linear_to_srgb(g.colors).numpy()
    opacity = g.opacities.numpy().clip(1e-6, 1 - 1e-6)
    # The reference takes 3DGS .ply values, unconverted (its coordinate system UNSPECIFIED).
    reference = alspz.save_spz(
        means.numpy(),
        np.log(g.scales.numpy()),
        quaternions.numpy()[:, [1, 2, 3, 0]],  # (x, y, z, w)
        np.log(opacity / (1 - opacity)),
        (srgb - np.float32(0.5)) / np.float32(SH_C0),
        None,
        0,
        version=version,
    )
    ours = write_spz(g, version=version)
    reference_header, reference_streams = read_spz_streams(reference)
    header, streams = read_spz_streams(ours)
    assert header == reference_header
    for name in ("positions", "colors", "scales", "rotations"):
        assert streams[name] == reference_streams[name], name
    # The reference stores sigmoid(logit(opacity)) * 255: equal but for float32 rounding.
    alphas = np.frombuffer(streams["alphas"], np.uint8).astype(int)
    assert np.abs(alphas - np.frombuffer(reference_streams["alphas"], np.uint8)).max() <= 1

    decoded = alspz.load_spz(ours)
    assert decoded["num_points"] == len(g)
    assert np.abs(decoded["positions"] - means.numpy()).max() <= 2**-13 + EPS
    assert np.abs(decoded["scales"] - np.log(g.scales.numpy())).max() <= 1 / 32 + 1e-5
    back = read_spz(ours)
    _, rotations = rdf_to_rub(back.means, back.quaternions)
    np.testing.assert_allclose(decoded["rotations"], rotations[:, [1, 2, 3, 0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# .splat
# ---------------------------------------------------------------------------------------------


def splat_golden_gaussians() -> Gaussians:
    return Gaussians(
        means=torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 4.0], [-1.5, 0.25, 3.0]]),
        scales=torch.tensor([[0.5, 0.25, 2.0], [1.0, 1.0, 1.0], [0.125, 0.125, 0.125]]),
        quaternions=torch.tensor([[2.0, 0, 0, 0], [0.5, 0.5, -0.5, 0.5], [0, 0, 0, -3.0]]),
        colors=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.05], [1.0, 1.0, 1.0]]),
        opacities=torch.tensor([1.0, 0.5, 0.75]),
    )


# Rows sorted by scale_x * scale_y * scale_z * alpha, largest first:
#   A 0.5 * 0.25 * 2 * 1.0 = 0.25, B 1 * 0.5 = 0.5, C 0.125^3 * 0.75 = 0.0015 -> B, A, C.
# Floats are IEEE 754 little-endian; colours round(sRGB * 255), alpha round(opacity * 255),
# rotation (w, x, y, z) round(q * 128 + 128) clamped to 255.
# fmt: off
GOLDEN_SPLAT = bytes.fromhex(
    # B
    "00000000" "00000000" "00008040"  # position (0, 0, 4): 4.0 = 0x40800000
    "0000803f" "0000803f" "0000803f"  # scale (1, 1, 1): 1.0 = 0x3f800000
    "00ff3f80"  # linear (0, 1, 0.05) -> sRGB (0, 0.99999994, 0.2478) -> 0, 255, 63.19 -> 63;
    #             alpha 0.5 -> 127.5 -> 128 (half to even)
    "c0c040c0"  # (0.5, 0.5, -0.5, 0.5) -> 192, 192, 64, 192
    # A
    "0000803f" "000000c0" "0000003f"  # position (1, -2, 0.5): -2.0 = 0xc0000000, 0.5 = 0x3f000000
    "0000003f" "0000803e" "00000040"  # scale (0.5, 0.25, 2): 0.25 = 0x3e800000, 2.0 = 0x40000000
    "ff0000ff"  # (1, 0, 0), alpha 1
    "ff808080"  # (1, 0, 0, 0): 256 -> 255, then 128, 128, 128
    # C
    "0000c0bf" "0000803e" "00004040"  # position (-1.5, 0.25, 3): -1.5 = 0xbfc00000, 3 = 0x40400000
    "0000003e" "0000003e" "0000003e"  # scale 0.125 = 0x3e000000
    "ffffffbf"  # (1, 1, 1), alpha 0.75 -> 191.25 -> 191
    "80808000"  # (0, 0, 0, -1): 128, 128, 128, 0
)
# fmt: on


def test_splat_matches_the_specification_byte_for_byte() -> None:
    assert write_splat(splat_golden_gaussians()) == GOLDEN_SPLAT


def test_splat_sorts_by_volume_times_opacity_with_ties_in_input_order() -> None:
    g = random_gaussians(500)
    # Make ties: Gaussians 0..99 share one score, 100..199 another.
    scales = g.scales.clone()
    opacities = g.opacities.clone()
    scales[:100], opacities[:100] = torch.tensor([0.1, 0.2, 0.3]), 0.5
    scales[100:200], opacities[100:200] = torch.tensor([0.3, 0.2, 0.1]), 0.5
    g = Gaussians(g.means, scales, g.quaternions, g.colors, opacities)
    back = read_splat(write_splat(g))
    score = (scales.prod(dim=1) * opacities).numpy()
    order = np.lexsort((np.arange(500), -score))  # by score descending, then index
    assert torch.equal(back.means, g.means[order])


def test_splat_round_trip_within_quantization() -> None:
    g = random_gaussians()
    back = read_splat(write_splat(g))
    score = (g.scales.prod(dim=1) * g.opacities).numpy()
    g = g.index(torch.from_numpy(np.lexsort((np.arange(len(g)), -score))))

    assert torch.equal(back.means, g.means) and torch.equal(back.scales, g.scales)
    assert (back.opacities - g.opacities).abs().max() <= 0.5 / 255 + EPS
    srgb_error = linear_to_srgb(back.colors) - linear_to_srgb(g.colors)
    assert srgb_error.abs().max() <= 0.5 / 255 + 1e-5
    q = unit(g.quaternions)
    error = (back.quaternions - q).abs()
    saturated = q * 128 + 128 > 254.5
    assert error[~saturated].max() <= 0.5 / 128 + EPS
    assert error[saturated].max() <= 1 / 128 + EPS


def test_splat_reader_rejects_partial_rows() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        read_splat(bytes(33))


# ---------------------------------------------------------------------------------------------
# Determinism and the registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("splat", {}),
        ("spz", {"spz_version": 2}),
        ("spz", {"spz_version": 3}),
        pytest.param("spz", {"spz_version": 4}, marks=NEEDS_ZSTD),
    ],
)
def test_same_input_gives_identical_bytes(fmt: str, options: dict) -> None:
    first = encode(random_gaussians(seed=1), fmt, **CAMERA, **options).data
    second = encode(random_gaussians(seed=1), fmt, **CAMERA, **options).data
    assert first == second
    assert first != encode(random_gaussians(seed=2), fmt, **CAMERA, **options).data


def test_encode_describes_each_format() -> None:
    g = random_gaussians(50)
    assert FORMATS == ("ply", "spz", "splat", "sog")
    spz = encode(g, "spz", **CAMERA)
    assert spz == EncodedSplat(write_spz(g), "spz", "application/octet-stream", ".spz")
    assert read_spz_streams(encode(g, "spz", **CAMERA, spz_version=2).data)[0].version == 2
    splat = encode(g, "splat", **CAMERA)
    assert splat == EncodedSplat(write_splat(g), "splat", "application/octet-stream", ".splat")


def test_encode_ply_delegates_to_engine_ply() -> None:
    ply = pytest.importorskip("engine.splats.formats.ply")
    g = random_gaussians(50)
    for layout in ("standard", "sharp"):
        encoded = encode(g, "ply", **CAMERA, ply_layout=layout)
        assert encoded.data == ply.write_ply(g, **CAMERA, layout=layout)
        assert (encoded.format, encoded.extension) == ("ply", ".ply")


def test_encode_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="ply, spz, splat"):
        encode(random_gaussians(5), "glb", **CAMERA)
