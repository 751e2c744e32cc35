"""The .sog reader: SOG v2 bytes to Gaussians, by the formulas of engine.splats.formats.sog.

Independent of the writer, and bounded: nothing is inflated or decoded beyond what meta.json's
`count` accounts for, so a small hostile archive cannot fill the memory.
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

from engine.splats.formats.codebook import CODEBOOK_SIZE
from engine.splats.formats.common import SH_C0, linear_colors
from engine.splats.formats.sog import FILES, OTHER_COMPONENTS, VERSION
from engine.splats.gaussians import Gaussians

_SQRT2 = math.sqrt(2.0)


def read_sog(data: bytes) -> Gaussians:
    """Decode bundled .sog bytes into Gaussians, as the specification's readers do.

    Independent of the writer: it follows meta.json and decodes every texel by the formulas of
    the module docstring. Colours come back as linear RGB, rotations as unit (w, x, y, z).
    """
    meta, images = read_sog_files(data)
    n = meta["count"]
    texels = {name: image.reshape(-1, 4)[:n] for name, image in images.items()}
    low, high = (texels[f].astype(np.int64) for f in meta["means"]["files"])
    mins, maxs = (np.asarray(meta["means"][k], np.float64) for k in ("mins", "maxs"))
    v = mins + (maxs - mins) * ((high[:, :3] << 8) | low[:, :3]) / 65535
    means = np.sign(v) * np.expm1(np.abs(v))

    quats = texels[meta["quats"]["files"][0]]
    tags = quats[:, 3].astype(np.int64) - 252
    if tags.size and (tags.min() < 0 or tags.max() > 3):
        raise ValueError("quats.webp alpha must be 252-255 (the largest component's index)")
    others = (quats[:, :3] / 255.0 * 2 - 1) / _SQRT2
    wxyz = np.empty((n, 4))
    np.put_along_axis(wxyz, np.asarray(OTHER_COMPONENTS)[tags], others, axis=1)
    largest = np.sqrt(np.maximum(0.0, 1 - (others * others).sum(axis=1)))
    np.put_along_axis(wxyz, tags[:, None], largest[:, None], axis=1)

    scale_book = np.asarray(meta["scales"]["codebook"], np.float64)
    color_book = np.asarray(meta["sh0"]["codebook"], np.float64)
    sh0 = texels[meta["sh0"]["files"][0]]
    scales = np.exp(scale_book[texels[meta["scales"]["files"][0]][:, :3]])
    srgb = 0.5 + SH_C0 * color_book[sh0[:, :3]]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Gaussians(
        means=tensor(means),
        scales=tensor(scales),
        quaternions=tensor(wxyz),
        colors=linear_colors(srgb.astype(np.float32)),
        opacities=tensor(sh0[:, 3] / 255.0),
    )


def read_sog_files(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """meta.json and each image it names, as (H, W, 4) uint8 RGBA, from bundled .sog bytes.

    Checks what every reader relies on: version 2, the files present and decodable, one image
    size with at least `count` texels, 3 mins and maxs, codebooks of 256 entries; anything else
    raises ValueError. Nothing is inflated or decoded beyond what `count` (<= MAX_READ_POINTS)
    accounts for: a small hostile archive cannot fill the memory.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"not a .sog file (a ZIP archive): {error}") from None
    with archive:
        if "meta.json" not in archive.namelist():
            raise ValueError(".sog archive has no meta.json")
        text = _read_member(archive, "meta.json", _MAX_META_BYTES)
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ValueError(f"meta.json is not valid JSON ({error})") from None
        try:
            images = _read_images(archive, meta, _texel_budget(meta))
            _check_meta(meta, images)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"malformed meta.json ({type(error).__name__}: {error})") from None
    return meta, images


_MAX_META_BYTES = 1 << 20  # a few numbers and two 256-entry codebooks: kilobytes
MAX_READ_POINTS = 1 << 24  # the most Gaussians a file may declare to be read: 14x SHARP's


def _texel_budget(meta: dict) -> int:
    """The most texels an image may have: room for any sensible layout of `count`."""
    count = meta["count"]
    if type(count) is not int or not 0 <= count <= MAX_READ_POINTS:
        raise ValueError(f"meta.json count must be from 0 to {MAX_READ_POINTS:,}, got {count!r}")
    return 2 * count + (1 << 16)


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One archive member, inflated no further than `limit` bytes."""
    try:
        with archive.open(name) as member:  # the declared size may be a lie: read one more
            content = b"" if archive.getinfo(name).file_size > limit else member.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, zlib.error) as error:
        raise ValueError(f".sog member {name} cannot be read: {error}") from None
    if len(content) > limit or archive.getinfo(name).file_size > limit:
        raise ValueError(f".sog member {name} is larger than the {limit:,} bytes it can hold")
    return content


def _read_images(archive: zipfile.ZipFile, meta: dict, texels: int) -> dict[str, np.ndarray]:
    if meta.get("version") != VERSION:
        raise ValueError(f"only SOG version {VERSION} is supported, got {meta.get('version')!r}")
    if "shN" in meta:
        raise ValueError("higher-order spherical harmonics (shN) are not supported")
    names, images = set(archive.namelist()), {}
    member_limit = 5 * texels + (1 << 16)  # a lossless WebP is hardly larger than raw RGBA
    for key, files in FILES.items():
        if len(meta[key]["files"]) != len(files):
            raise ValueError(f"meta.json {key}.files must name {len(files)} image(s)")
        for name in meta[key]["files"]:
            if name not in names:
                raise ValueError(f".sog archive lacks {name}, named by meta.json")
            images[name] = _decode_image(name, _read_member(archive, name, member_limit), texels)
    return images


def _decode_image(name: str, content: bytes, texels: int) -> np.ndarray:
    try:  # the declared size is checked before any texel is decoded; Pillow's warning is noise
        with warnings.catch_warnings(action="ignore"), Image.open(io.BytesIO(content)) as image:
            width, height = image.size
            if image.format == "WEBP" and width * height <= texels:
                return np.asarray(image.convert("RGBA"))
    except Exception as error:  # any decoder's failure on hostile bytes, bombs included
        raise ValueError(f"{name} is not a readable image: {error}") from None
    raise ValueError(f"{name} is not a readable image: not a WebP of at most {texels:,} texels")


def _check_meta(meta: dict, images: dict[str, np.ndarray]) -> None:
    for key in ("scales", "sh0"):
        if len(meta[key]["codebook"]) != CODEBOOK_SIZE:
            raise ValueError(f"meta.json {key}.codebook must have {CODEBOOK_SIZE} entries")
    if not len(meta["means"]["mins"]) == len(meta["means"]["maxs"]) == 3:
        raise ValueError("meta.json means.mins and means.maxs must have 3 values each")
    sizes = {image.shape[:2] for image in images.values()}
    if len(sizes) != 1:
        raise ValueError(f".sog images differ in size: {sorted(sizes)}")
    (height, width), count = sizes.pop(), meta["count"]
    if not isinstance(count, int) or not 0 <= count <= width * height:
        raise ValueError(f"count {count!r} does not fit {width} x {height} images")
