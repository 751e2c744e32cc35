"""Niantic's .spz compressed splat format: writer and reader for versions 2, 3 and 4.

Specification: github.com/nianticlabs/spz, README.md ("File Format") and src/cc/load-spz.cc
(`packGaussians`, `serializePackedGaussians`, `saveSpz`, `unpackGaussians`). The byte layout
below follows load-spz.cc; tests check it byte for byte against bytes derived by hand and, where
Niantic's own C++ is installed (PyPI `alspz` vendors it), against its encoder and decoder.

Container:
  * Versions 1-3: one gzip stream holding a 16-byte little-endian header (magic 0x5053474e
    "NGSP", version u32, numPoints u32, shDegree u8, fractionalBits u8, flags u8, reserved u8)
    and then the attribute blocks in the order positions, alphas, colors, scales, rotations,
    spherical harmonics (none for degree 0).
  * Version 4: a plaintext 32-byte header (magic, version, numPoints, shDegree,
    fractionalBits, flags, numStreams u8, tocByteOffset u32, 12 reserved bytes), a table of
    contents of (compressedSize u64, uncompressedSize u64) per stream, then each non-empty
    attribute block as its own zstd frame, in the same order.

Attributes, per Gaussian:
  * position: 3 x 24-bit two's-complement fixed point with `fractionalBits` = 12 fraction bits
    (1/4096 m = 0.24 mm). The reference wraps values beyond +-2048 m; we clamp them.
  * alpha: u8 = round(opacity * 255) (the reference stores sigmoid(logit) * 255).
  * color: u8 = round(sh0 * 0.15 * 255 + 127.5): sh0 is the degree-0 SH coefficient, scaled
    by 0.15 instead of SH_C0 so that colours somewhat outside 0..1 survive.
  * scale: u8 = round((ln(scale) + 10) * 16): log steps of 1/16 over ln(scale) in [-10, 5.9].
  * rotation: version 2: 3 bytes, x, y, z of the unit quaternion with w >= 0, each
    round(c * 127.5 + 127.5). Versions 3-4: "smallest three" in one little-endian u32: bits
    31-30 hold the index (x=0, y=1, z=2, w=3) of the largest |component|, made positive by
    negating the quaternion; the other three follow in x, y, z, w order from bit 29 down,
    10 bits each: a sign bit and a 9-bit magnitude round_down(|c| / sqrt(1/2) * 511 + 0.5).
  "round" is C's roundf (halves away from zero) and every value is clamped to 0..255.

Axes: .spz stores RUB (x right, y up, z back: OpenGL, three.js), and Niantic's loader converts
to the caller's system from there. Our Gaussians are RDF (OpenCV: x right, y down, z forward),
so the writer applies `rdf_to_rub`, a rotation by pi about x; viewers that treat .spz as RUB
(Spark, three.js loaders) then show the scene upright, looking down -z as the camera did.

SHARP predicts no higher-order SH (shDegree 0), and we leave the antialiased flag (0x1) unset,
as the .ply carries no such claim either. Niantic's loader rejects files with zero points, so
the writer refuses to write one.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from engine.splats.formats.common import (
    SH_C0,
    dc_coefficients,
    linear_colors,
    round_half_away,
    srgb_colors,
    to_numpy,
    to_uint8,
    unit_quaternions,
)
from engine.splats.gaussians import Gaussians

MAGIC = 0x5053474E  # "NGSP" in file order
VERSIONS = (2, 3, 4)
DEFAULT_VERSION = 3  # the newest that Spark and the gzip-era loaders (1-3) all read
# The most Gaussians a file may declare to be read: 14x a SHARP result, 340 MB decompressed.
MAX_READ_POINTS = 1 << 24
FRACTIONAL_BITS = 12
COLOR_SCALE = 0.15
# Stream order in the file; the spherical-harmonics block (last) is empty for degree 0.
STREAMS = ("positions", "alphas", "colors", "scales", "rotations")
# Compression: the reference uses zlib's default level (6) and zstd level 12, which each take
# about a second for a full SHARP result on one core. ISA-L's gzip at level 2 (PyPI `isal`) is
# ~5x faster than zlib's level 1 and within 2% of zlib's level 6 in size; without it, zlib
# level 1. zstd's default level 3 is within 4% of level 12. See benchmarks/bench_formats.py.
ISAL_LEVEL = 2
ZLIB_LEVEL = 1
ZSTD_LEVEL = 3

_LEGACY_HEADER = struct.Struct("<IIIBBBB")
_NGSP_HEADER = struct.Struct("<IIIBBBBI12x")
_TOC_ENTRY = struct.Struct("<QQ")
_SQRT1_2 = np.float32(0.707106781186547524401)
_MAG_MAX = 511  # 9-bit magnitudes
_FIXED_LIMIT = 1 << 23  # 24-bit signed range
# The three smaller components for each index of the largest, in the order they are packed.
_OTHERS = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


@dataclass(frozen=True)
class SpzHeader:
    version: int
    num_points: int
    sh_degree: int
    fractional_bits: int
    flags: int


def rdf_to_rub(means: torch.Tensor, quaternions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and (w, x, y, z) rotations from OpenCV RDF axes to .spz RUB axes, and back.

    RDF -> RUB negates y and z: the rotation F = diag(1, -1, -1) by pi about x. A Gaussian's
    rotation R becomes F R F, whose quaternion keeps w and x and negates y and z (Niantic's
    flipQ = (y*z, x*z, x*y) for flips (x, y, z) = (1, -1, -1)). F is its own inverse, so the
    same function converts RUB back to RDF.
    """
    flip = means.new_tensor([1.0, -1.0, -1.0])
    quaternion_flip = quaternions.new_tensor([1.0, 1.0, -1.0, -1.0])
    return means * flip, quaternions * quaternion_flip


rub_to_rdf = rdf_to_rub  # F = F^-1


def write_spz(gaussians: Gaussians, *, version: int = DEFAULT_VERSION) -> bytes:
    """Encode Gaussians as .spz bytes, deterministically: the same input and compression
    library give the same bytes."""
    if version not in VERSIONS:
        raise ValueError(f"spz version must be one of {VERSIONS}, got {version}")
    if len(gaussians) == 0:
        raise ValueError("spz cannot hold zero Gaussians: Niantic's loader rejects numPoints 0")
    means, quaternions = rdf_to_rub(gaussians.means, gaussians.quaternions)
    rotations = unit_quaternions(to_numpy(quaternions))
    streams = [
        _pack_positions(to_numpy(means)),
        to_uint8(to_numpy(gaussians.opacities) * np.float32(255)).tobytes(),
        to_uint8(
            dc_coefficients(srgb_colors(gaussians)) * np.float32(COLOR_SCALE * 255)
            + np.float32(127.5)
        ).tobytes(),
        to_uint8((np.log(to_numpy(gaussians.scales)) + np.float32(10)) * np.float32(16)).tobytes(),
        _pack_smallest_three(rotations) if version >= 3 else _pack_first_three(rotations),
    ]
    header = SpzHeader(version, len(gaussians), 0, FRACTIONAL_BITS, 0)
    if version >= 4:
        return _ngsp_container(header, streams)
    return _gzip(_legacy_header(header) + b"".join(streams))


def read_spz(data: bytes) -> Gaussians:
    """Decode .spz bytes (versions 2-4, shDegree 0) into Gaussians in OpenCV axes.

    Inverts every step of the writer up to quantization, as Niantic's unpackGaussians does:
    colours come back as linear RGB, opacities as alpha / 255, rotations as (w, x, y, z):
    unit quaternions from versions 3-4; from version 2, w = sqrt(max(0, 1 - |xyz|²)), so
    |q| may exceed 1 by up to 1%.
    """
    header, streams = read_spz_streams(data)
    if header.sh_degree != 0:
        raise ValueError(f"only shDegree 0 is supported, the file has {header.sh_degree}")
    n = header.num_points
    positions = _unpack_positions(streams["positions"], header.fractional_bits)
    alphas = np.frombuffer(streams["alphas"], np.uint8).astype(np.float32) / np.float32(255)
    colors = np.frombuffer(streams["colors"], np.uint8).reshape(n, 3).astype(np.float32)
    sh0 = (colors / np.float32(255) - np.float32(0.5)) / np.float32(COLOR_SCALE)
    srgb = np.float32(0.5) + np.float32(SH_C0) * sh0
    log_scales = np.frombuffer(streams["scales"], np.uint8).reshape(n, 3) / np.float32(16) - 10
    if header.version >= 3:
        xyzw = _unpack_smallest_three(streams["rotations"])
    else:
        xyzw = _unpack_first_three(streams["rotations"])
    means, quaternions = rub_to_rdf(
        torch.from_numpy(positions), torch.from_numpy(np.ascontiguousarray(xyzw[:, [3, 0, 1, 2]]))
    )
    return Gaussians(
        means=means,
        scales=torch.from_numpy(np.exp(log_scales).astype(np.float32)),
        quaternions=quaternions,
        colors=linear_colors(srgb),
        opacities=torch.from_numpy(alphas),
    )


def read_spz_streams(data: bytes) -> tuple[SpzHeader, dict[str, bytes]]:
    """The header and the decompressed attribute blocks (keyed by STREAMS names) of .spz bytes.

    Nothing is decompressed beyond what the header says the file holds, and the header may
    declare at most MAX_READ_POINTS Gaussians: a small hostile file cannot fill the memory.
    """
    if data[:2] == b"\x1f\x8b":
        return _read_legacy(_gunzip_bounded(data))
    if len(data) >= _NGSP_HEADER.size and struct.unpack_from("<I", data)[0] == MAGIC:
        return _read_ngsp(data)
    raise ValueError("not an .spz file: neither gzip (versions 1-3) nor an NGSP header (4+)")


def _gunzip_bounded(data: bytes) -> bytes:
    """The gzip payload, inflated no further than its header's point count allows."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        payload = inflater.decompress(data, _LEGACY_HEADER.size)
        if len(payload) < _LEGACY_HEADER.size:
            raise ValueError("truncated .spz: the file ends inside its header")
        magic, version, n, *_ = _LEGACY_HEADER.unpack_from(payload)
        _check_legacy(magic, version)
        _check_point_count(n)
        expected = _LEGACY_HEADER.size + sum(
            _block_sizes(SpzHeader(version, n, 0, FRACTIONAL_BITS, 0))
        )
        # One byte more than the header allows tells a file that holds more than it says.
        payload += inflater.decompress(inflater.unconsumed_tail, expected + 1 - len(payload))
    except zlib.error as error:
        raise ValueError(f"corrupt .spz: its gzip stream is damaged ({error})") from None
    if len(payload) > expected:
        raise ValueError(
            f".spz decompresses to more than the {expected:,} bytes its header declares"
        )
    if not inflater.eof:
        raise ValueError(
            f"truncated .spz: {len(payload):,} of {expected:,} bytes, the gzip stream ends early"
        )
    return payload


def _check_legacy(magic: int, version: int) -> None:
    if magic != MAGIC or version not in (2, 3):
        raise ValueError(f"unsupported .spz: magic {magic:#x}, version {version}")


def _check_point_count(n: int) -> None:
    if n > MAX_READ_POINTS:
        raise ValueError(
            f".spz header declares {n:,} Gaussians; at most {MAX_READ_POINTS:,} are read"
        )


# --- attribute blocks -------------------------------------------------------------------------


def _pack_positions(means: np.ndarray) -> bytes:
    """24-bit little-endian two's complement, x y z per Gaussian."""
    fixed = round_half_away(means * np.float32(1 << FRACTIONAL_BITS))
    fixed = np.clip(fixed, -_FIXED_LIMIT, _FIXED_LIMIT - 1)
    return fixed.astype("<i4").view(np.uint8).reshape(-1, 3, 4)[:, :, :3].tobytes()


def _unpack_positions(block: bytes, fractional_bits: int) -> np.ndarray:
    b = np.frombuffer(block, np.uint8).reshape(-1, 3, 3).astype(np.int32)
    fixed = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    fixed = (fixed ^ _FIXED_LIMIT) - _FIXED_LIMIT  # sign-extend bit 23
    return (fixed * np.float32(2.0**-fractional_bits)).astype(np.float32)


def _pack_first_three(q: tuple[np.ndarray, ...]) -> bytes:
    """Version 2: x, y, z of the quaternion with w >= 0, each in 8 bits."""
    x, y, z, w = q
    scale = np.where(w < 0, np.float32(-127.5), np.float32(127.5))
    return to_uint8(np.stack([x, y, z], axis=1) * scale[:, None] + np.float32(127.5)).tobytes()


def _unpack_first_three(block: bytes) -> np.ndarray:
    # The reference's float32 steps: w = sqrt(1 - |xyz|²) amplifies any rounding difference.
    xyz = np.frombuffer(block, np.uint8).reshape(-1, 3) * np.float32(1 / 127.5) - np.float32(1)
    x, y, z = xyz.T
    w = np.sqrt(np.maximum(np.float32(0), np.float32(1) - (x * x + y * y + z * z)))
    return np.concatenate([xyz, w[:, None]], axis=1)


def _pack_smallest_three(q: tuple[np.ndarray, ...]) -> bytes:
    """Versions 3+: the index of the largest |component| and the other three in 10 bits each."""
    x, y, z, w = q
    # The first of equal maxima wins, as in the reference's strict-greater loop.
    largest = np.zeros(len(x), np.uint32)
    peak, peak_value = np.abs(x), x
    for index, c in enumerate((y, z, w), start=1):
        greater = np.abs(c) > peak
        largest[greater] = index
        peak = np.where(greater, np.abs(c), peak)
        peak_value = np.where(greater, c, peak_value)
    negate = peak_value < 0
    # The other three in x, y, z, w order: for largest = 0 they are (y, z, w), for 3 (x, y, z).
    others = (
        np.where(largest == 0, y, x),
        np.where(largest <= 1, z, y),
        np.where(largest <= 2, w, z),
    )
    word = largest << 30
    for shift, c in zip((20, 10, 0), others):
        sign = ((c < 0) ^ negate).astype(np.uint32)
        magnitude = (np.float32(_MAG_MAX) * (np.abs(c) / _SQRT1_2) + np.float32(0.5)).astype(
            np.uint32
        )
        word |= ((sign << 9) | magnitude) << shift
    return word.astype("<u4").tobytes()


def _unpack_smallest_three(block: bytes) -> np.ndarray:
    word = np.frombuffer(block, "<u4")
    largest = (word >> 30).astype(np.intp)
    fields = np.stack([(word >> shift) & 0x3FF for shift in (20, 10, 0)], axis=1)
    others = _SQRT1_2 * (fields & _MAG_MAX).astype(np.float32) / np.float32(_MAG_MAX)
    others = np.where((fields >> 9) == 1, -others, others)
    q = np.empty((len(word), 4), np.float32)
    np.put_along_axis(q, _OTHERS[largest], others, axis=1)
    rest = np.maximum(0, 1 - (others * others).sum(axis=1))
    np.put_along_axis(q, largest[:, None], np.sqrt(rest)[:, None], axis=1)
    return q


# --- containers -------------------------------------------------------------------------------


def _legacy_header(h: SpzHeader) -> bytes:
    return _LEGACY_HEADER.pack(
        MAGIC, h.version, h.num_points, h.sh_degree, h.fractional_bits, h.flags, 0
    )


def _gzip(payload: bytes) -> bytes:
    """A gzip file with mtime 0, so that equal payloads give equal bytes."""
    try:
        from isal import igzip
    except ImportError:
        # zlib's own gzip wrapper (wbits 16 + 15) writes mtime 0; memLevel 9 as in Niantic's
        # compressGzipped.
        compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9)
        return compressor.compress(payload) + compressor.flush()
    return igzip.compress(payload, ISAL_LEVEL, mtime=0)


def _ngsp_container(h: SpzHeader, streams: list[bytes]) -> bytes:
    # The reference skips empty blocks; with shDegree 0 that is the SH block, never passed here.
    zstd = _zstd()
    frames = [zstd.compress(s, level=ZSTD_LEVEL) for s in streams]
    header = _NGSP_HEADER.pack(
        MAGIC,
        h.version,
        h.num_points,
        h.sh_degree,
        h.fractional_bits,
        h.flags,
        len(frames),
        _NGSP_HEADER.size,  # no extensions: the TOC follows the header
    )
    toc = b"".join(_TOC_ENTRY.pack(len(f), len(s)) for f, s in zip(frames, streams))
    return header + toc + b"".join(frames)


def _read_legacy(payload: bytes) -> tuple[SpzHeader, dict[str, bytes]]:
    if len(payload) < _LEGACY_HEADER.size:
        raise ValueError("truncated .spz header")
    magic, version, n, sh_degree, fractional_bits, flags, _ = _LEGACY_HEADER.unpack_from(payload)
    _check_legacy(magic, version)
    header = SpzHeader(version, n, sh_degree, fractional_bits, flags)
    streams, offset = {}, _LEGACY_HEADER.size
    for name, size in zip(STREAMS, _block_sizes(header)):
        streams[name] = payload[offset : offset + size]
        offset += size
    if offset > len(payload):
        raise ValueError(f".spz payload has {len(payload)} bytes, its header needs {offset}")
    return header, streams


def _read_ngsp(data: bytes) -> tuple[SpzHeader, dict[str, bytes]]:
    _, version, n, sh_degree, fractional_bits, flags, num_streams, toc_offset = (
        _NGSP_HEADER.unpack_from(data)
    )
    if version < 4:
        raise ValueError(f"an NGSP header must have version >= 4, got {version}")
    _check_point_count(n)
    header = SpzHeader(version, n, sh_degree, fractional_bits, flags)
    sizes = _block_sizes(header)
    if num_streams != len(sizes):
        raise ValueError(f"expected {len(sizes)} streams for shDegree 0, got {num_streams}")
    zstd = _zstd()
    streams, offset = {}, toc_offset + num_streams * _TOC_ENTRY.size
    if offset > len(data):
        raise ValueError("truncated .spz: the file ends inside its table of streams")
    for i, (name, size) in enumerate(zip(STREAMS, sizes)):
        compressed, uncompressed = _TOC_ENTRY.unpack_from(data, toc_offset + i * _TOC_ENTRY.size)
        if uncompressed != size:
            raise ValueError(f"stream {name} has {uncompressed} bytes, expected {size}")
        if offset + compressed > len(data):
            raise ValueError(f"truncated .spz: the file ends inside stream {name}")
        try:
            # At most one byte more than declared: enough to tell a stream that holds more.
            block = zstd.ZstdDecompressor().decompress(
                data[offset : offset + compressed], max_length=size + 1
            )
        except zstd.ZstdError as error:
            raise ValueError(f"corrupt .spz: stream {name} is damaged ({error})") from None
        offset += compressed
        if len(block) != size:
            raise ValueError(f"stream {name} decompressed to {len(block):,} bytes, not {size:,}")
        streams[name] = block
    return header, streams


def _block_sizes(h: SpzHeader) -> tuple[int, ...]:
    n = h.num_points
    return (9 * n, n, 3 * n, 3 * n, (4 if h.version >= 3 else 3) * n)


def _zstd() -> ModuleType:
    """zstd for version 4: the standard library's from Python 3.14, else `backports.zstd`."""
    try:
        from compression import zstd
    except ImportError:
        try:
            from backports import zstd
        except ImportError:
            raise ImportError(
                ".spz version 4 needs zstd: Python 3.14+ or `pip install backports.zstd`"
            ) from None
    return zstd
