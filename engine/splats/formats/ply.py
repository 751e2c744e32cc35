"""Gaussian splats as binary .ply files: writer, and a small strict reader.

Each Gaussian is one vertex row of 14 little-endian float32 properties, as 3D Gaussian Splatting
viewers expect: position, degree-0 spherical-harmonics color (of sRGB colors), opacity logit,
log scales and the rotation quaternion (w, x, y, z).

Two layouts:
  "standard": the vertex element only; the default. antimatter15's splat viewer and gsplat.js
    take the row stride to be the sum of the sizes of *all* properties in the header, whatever
    element they belong to, so any extra element shifts every row after the first (and
    gsplat.js rejects the uint and uchar properties outright).
  "sharp": byte-for-byte the layout of Apple's SHARP reference: the vertex element followed by
    extrinsic, intrinsic, image_size, frame, disparity, color_space and version elements that
    SHARP's own tools read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from engine.network.color import srgb_to_linear
from engine.splats.formats.common import SH_C0, sh0_from_linear
from engine.splats.gaussians import Gaussians

Layout = Literal["standard", "sharp"]

VERTEX_PROPERTIES = (
    "x", "y", "z",
    "f_dc_0", "f_dc_1", "f_dc_2",
    "opacity",
    "scale_0", "scale_1", "scale_2",
    "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip


# Opacities are clamped into [OPACITY_EPS, 1 - OPACITY_EPS] before the logit so that 0 and 1 stay
# finite (logit ±13.8); decoding then misses them by about 1e-6, well inside the 1e-4 tolerance.
OPACITY_EPS = 1e-6

# SHARP's color_space code for sRGB (1: linear RGB); its files store sRGB (see vertex_rows).
_SRGB = 0
_SHARP_VERSION = (1, 5, 0)
# Quantiles of 1/z that the reference stores as the scene's disparity range.
_DISPARITY_QUANTILES = (0.1, 0.9)

_PLY_TYPES = {
    "char": "i1", "uchar": "u1", "short": "<i2", "ushort": "<u2",
    "int": "<i4", "uint": "<u4", "float": "<f4", "double": "<f8",
}  # fmt: skip
_PLY_TYPE_NAMES = {np.dtype(code): name for name, code in _PLY_TYPES.items()}
_HEADER_END = b"end_header\n"


@dataclass(frozen=True)
class PlyContents:
    """A decoded .ply file.

    vertices: the vertex rows as a structured array, one field per property, as stored.
    gaussians: the vertices decoded: linear RGB colors, opacities in 0..1, scales, quaternions.
    elements: every other element by name; an element with a single property as that property's
        plain array (intrinsic -> 9 floats), otherwise as a structured array.
    """

    vertices: np.ndarray
    gaussians: Gaussians
    elements: dict[str, np.ndarray]


def write_ply(
    gaussians: Gaussians,
    *,
    image_width: int,
    image_height: int,
    focal_length_px: float,
    layout: Layout = "standard",
) -> bytes:
    """The .ply file of the Gaussians (camera metadata is stored by the "sharp" layout only)."""
    header, rows, footer = _encode(gaussians, image_width, image_height, focal_length_px, layout)
    return b"".join((header, memoryview(rows), footer))  # copies the rows once, into the result


def save_ply(
    path: str | os.PathLike[str],
    gaussians: Gaussians,
    *,
    image_width: int,
    image_height: int,
    focal_length_px: float,
    layout: Layout = "standard",
) -> None:
    """Write the .ply file of write_ply to path, straight from the rows without a bytes copy."""
    header, rows, footer = _encode(gaussians, image_width, image_height, focal_length_px, layout)
    with open(path, "wb") as f:
        f.write(header)
        f.write(memoryview(rows))
        f.write(footer)


def vertex_rows(gaussians: Gaussians) -> torch.Tensor:
    """(N, 14) float32 vertex rows in VERTEX_PROPERTIES order, on the Gaussians' device."""
    g = gaussians.contiguous()
    # SHARP predicts linear RGB but viewers blend stored colors as they are and show the
    # result without gamma, so store sRGB, as the reference does.
    f_dc = sh0_from_linear(g.colors.float())
    opacity_logits = torch.logit(g.opacities.float(), eps=OPACITY_EPS)
    log_scales = g.scales.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    # Unit quaternions, like the reference's: viewers normalize anyway, other readers may not.
    rotations = F.normalize(g.quaternions.float(), dim=-1)
    return torch.cat((g.means.float(), f_dc, opacity_logits[:, None], log_scales, rotations), dim=1)


def read_ply(data: bytes) -> PlyContents:
    """Parse a binary little-endian .ply of scalar properties with Gaussian vertex rows.

    Strict: anything else (ASCII or big-endian files, list properties, missing vertex
    properties, truncated or trailing bytes) raises ValueError.
    """
    elements = _parse_header(data)
    end = data.find(_HEADER_END) + len(_HEADER_END)
    arrays: dict[str, np.ndarray] = {}
    for name, count, dtype in elements:
        size = count * dtype.itemsize
        if end + size > len(data):
            raise ValueError(f"truncated .ply: element {name!r} needs {size} bytes")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=end)
        end += size
    if end != len(data):
        raise ValueError(f".ply has {len(data) - end} bytes after its last element")
    if "vertex" not in arrays:
        raise ValueError(".ply has no vertex element")
    vertices = arrays.pop("vertex")
    missing = set(VERTEX_PROPERTIES) - set(vertices.dtype.names)
    if missing:
        raise ValueError(f".ply vertices lack {sorted(missing)}")
    extras = {
        name: a[a.dtype.names[0]] if len(a.dtype.names) == 1 else a for name, a in arrays.items()
    }
    # Files without a color_space element are ours in the standard layout: sRGB.
    color_space = int(extras.get("color_space", [_SRGB])[0])
    return PlyContents(vertices, _decode(vertices, srgb=color_space == _SRGB), extras)


def _encode(
    gaussians: Gaussians, width: int, height: int, focal_length_px: float, layout: Layout
) -> tuple[bytes, np.ndarray, bytes]:
    """Header, the (N, 14) float32 rows as one host array, and the bytes after the rows."""
    if layout not in ("standard", "sharp"):
        raise ValueError(f"unknown .ply layout {layout!r}")
    rows = vertex_rows(gaussians).cpu().numpy().astype("<f4", copy=False)
    extras = _sharp_elements(gaussians, width, height, focal_length_px) if layout == "sharp" else {}
    header = _header(len(rows), extras)
    return header, rows, b"".join(a.tobytes() for a in extras.values())


def _header(num_vertices: int, extras: dict[str, np.ndarray]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {num_vertices}"]
    lines += [f"property float {name}" for name in VERTEX_PROPERTIES]
    for name, values in extras.items():
        lines += [
            f"element {name} {len(values)}",
            f"property {_PLY_TYPE_NAMES[values.dtype]} {name}",
        ]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def _sharp_elements(
    gaussians: Gaussians, width: int, height: int, focal_length_px: float
) -> dict[str, np.ndarray]:
    """The reference's metadata elements, in its order, each with a single property."""
    if len(gaussians) == 0:
        raise ValueError("the sharp layout needs at least one Gaussian (disparity quantiles)")
    f = focal_length_px
    disparity = _quantiles(1.0 / gaussians.means[:, 2].float(), _DISPARITY_QUANTILES)
    return {
        "extrinsic": np.eye(4, dtype="<f4").ravel(),
        "intrinsic": np.array([f, 0, width / 2, 0, f, height / 2, 0, 0, 1], dtype="<f4"),
        "image_size": np.array([width, height], dtype="<u4"),
        "frame": np.array([1, len(gaussians)], dtype="<i4"),
        "disparity": disparity.cpu().numpy().astype("<f4"),
        "color_space": np.array([_SRGB], dtype="u1"),
        "version": np.array(_SHARP_VERSION, dtype="u1"),
    }


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """torch.quantile(values, torch.tensor(qs)) bit for bit, on the CPU, without a full sort.

    torch.quantile's default linear interpolation: the rank q (n - 1) in the values' dtype, the
    order statistics either side of it, lerp by the rank's fraction. One np.partition places
    all of them in O(n), ~10x faster than sorting 1.2 M floats; torch.quantile also caps n at 2^24.
    """
    host = values.detach().cpu()
    if torch.isnan(host).any():
        return host.new_full((len(qs),), float("nan"))  # as torch.quantile
    n = host.numel()
    ranks = host.new_tensor(qs) * (n - 1)
    below = ranks.long()  # ranks >= 0: truncation is floor
    above = (below + 1).clamp(max=n - 1)
    kth = np.unique(torch.cat((below, above)).numpy())
    ordered = torch.from_numpy(np.partition(host.numpy(), kth))
    return torch.lerp(ordered[below], ordered[above], ranks - below)


def _parse_header(data: bytes) -> list[tuple[str, int, np.dtype]]:
    """[(element name, count, row dtype)] from the header of a binary little-endian .ply."""
    end = data.find(_HEADER_END)
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError("not a .ply file (no 'ply' magic or no end_header)")
    lines = data[:end].decode("ascii").split("\n")[1:-1]
    if not lines or lines[0] != "format binary_little_endian 1.0":
        raise ValueError(f"unsupported .ply format line {lines[:1]}")
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "element" and len(words) == 3 and re.fullmatch(r"\d+", words[2]):
            if any(words[1] == name for name, _, _ in elements):
                raise ValueError(f".ply has two elements named {words[1]!r}")
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and len(words) == 3 and words[1] in _PLY_TYPES and elements:
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        else:
            raise ValueError(f"unsupported .ply header line {line!r}")
    return [(name, count, np.dtype(fields)) for name, count, fields in elements]


def _decode(vertices: np.ndarray, *, srgb: bool) -> Gaussians:
    def columns(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([vertices[name] for name in names], axis=-1))

    colors = columns("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5
    return Gaussians(
        means=columns("x", "y", "z"),
        scales=columns("scale_0", "scale_1", "scale_2").exp(),
        quaternions=columns("rot_0", "rot_1", "rot_2", "rot_3"),
        colors=srgb_to_linear(colors) if srgb else colors,
        opacities=torch.sigmoid(columns("opacity")[:, 0]),
    )
