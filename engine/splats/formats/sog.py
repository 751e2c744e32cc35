"""PlayCanvas's SOG ("spatially ordered Gaussians", version 2): the writer (the reader: sog_reader).

Specification: developer.playcanvas.com, user manual > Gaussian splatting > formats > SOG, and
the readers that define it in practice: `readSog` of @playcanvas/splat-transform (whose
`writeSog` is the reference writer) and the PlayCanvas engine's GSplatSogData and SOG shaders.

A ZIP archive (STORE) of meta.json and five lossless WebP images of one size W x H. Texel
(x, y) of each image is Gaussian i = x + y * W (row-major from the top left); texels from
meta.json's `count` on are ignored.

  means_l, means_u  RGB   low and high bytes of 16-bit x, y, z
  quats             RGBA  A = 252 + the index of the largest component of the unit (w, x, y, z)
                          quaternion, made positive; RGB the other three in that order as
                          round((c * sqrt2 / 2 + 1/2) * 255); readers rebuild the largest as
                          sqrt(1 - |others|^2)
  scales            RGB   indices into meta.scales.codebook: 256 ln(scale), shared by the axes
  sh0               RGBA  RGB: indices into meta.sh0.codebook, 256 degree-0 SH coefficients
                          (srgb - 0.5) / SH_C0 shared by the channels; A = round(opacity * 255)

meta.json: {"version": 2, "asset": {"generator"}, "count", "means": {"mins", "maxs", "files"},
"scales": {"codebook", "files"}, "quats": {"files"}, "sh0": {"codebook", "files"}}; no shN.

Positions: t = sign(p) ln(1 + |p|) per coordinate; readers decode u16 n as p = sign(v)
(exp|v| - 1), v = mins + (maxs - mins) n / 65535. We round to the nearest n (the reference
truncates): with step = (maxs - mins) / 65535, |p error| <= (1 + |p|) step / 2 (1 + step). The
axes share the widest axis's range width (mins = per-axis minima, maxs = mins + width):
isotropic precision, as in fixed-point formats, where 16 bits across a thin axis (SHARP's depth
range can be a tenth of its width) would put noise in low bytes that no predictor compresses.
For the coffee sample: 0.05 mm at 2 m (.spz: 0.12 mm). That is the containers' finest
(level=None); by default each Gaussian is held only as finely as a viewer can see, and every
image shrinks (engine.splats.formats.sog_precision).

Codebooks (engine.splats.formats.codebook): a few Lloyd (1-D k-means) iterations on a 4096-bin histogram, each bin standing for
its values' mean with weight count^CODEBOOK_ALPHA. Exponent 1 is plain k-means, packing entries
where values are dense, which costs bits there; 0 spreads them evenly over the occupied range
(an entropy-coded uniform quantizer: the smallest images); 0.2 is nearly as small while a sparse
tail no longer takes entries from the bulk. The end entries are the data's extremes and each
value takes its nearest entry, so no value errs by more than half the largest gap between
entries. Entries ascend, so neighbouring indices hold neighbouring values: smooth images.

Layout: SHARP's unpruned output is 2 layers x 768 rows x 768 columns in that order: W = 768 with
the layers stacked (H = 1536) puts neighbouring pixels' Gaussians in neighbouring texels, and
WebP's spatial predictors turn the smooth fields into small residuals (the reference sorts by
Morton code instead). Other counts get a near-square image in the given order, W = ceil(sqrt(N))
rounded up to a multiple of 4 (as the reference), H = ceil(N / W), the spare texels repeating
the last Gaussian.

Axes: splat-transform reads a .ply and writes a .sog in one "PLY" space (it labels both
Transform.PLY, so converting moves nothing), and the PlayCanvas engine shows both alike. Our
.ply keeps OpenCV axes (x right, y down, z forward), so the .sog does too, and the .sog and the
.ply of an image look the same in every viewer. Colours are sRGB, as in every format here.

Effort: WebP lossless `method` and `quality` per image (EFFORTS). Quantization runs on the
Gaussians' device, then one copy of all the bytes to the host (on the CPU, each image is encoded
as soon as it is made); the WebP encodes run in threads (libwebp releases the GIL).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import engine.splats.formats.sog_precision as precision
from engine.network.color import linear_to_srgb
from engine.splats.formats.codebook import codebook_labels
from engine.splats.formats.common import SH_C0
from engine.splats.gaussians import Gaussians

VERSION = 2
GENERATOR = "sharp-runpod"
SHARP_GRID = (2, 768, 768)  # (layers, rows, columns) of an unpruned SHARP result
MAX_TEXTURE_SIDE = 16383  # WebP's limit
FILES = {
    "means": ["means_l.webp", "means_u.webp"],
    "scales": ["scales.webp"],
    "quats": ["quats.webp"],
    "sh0": ["sh0.webp"],
}
# WebP (method, quality) per image and effort, largest images first: per image the fastest
# setting of each size, on the tiny model's coffee.jpg result at level=None, libwebp 1.6 (MB, CPU s):
# 0: 9.8, 0.19; 1: 8.4, 0.66; 2: 7.8, 1.1; 3: 7.5, 1.9; 4: 7.46, 4.9; 5: 7.3, 18.
EFFORTS: dict[int, dict[str, tuple[int, int]]] = {
    0: {"means_l": (0, 0), "quats": (0, 0), "scales": (0, 0), "sh0": (0, 0), "means_u": (0, 0)},
    1: {"means_l": (1, 25), "quats": (1, 25), "scales": (0, 0), "sh0": (0, 0), "means_u": (0, 0)},
    2: {"means_l": (1, 25), "quats": (1, 25), "scales": (1, 0), "sh0": (1, 0), "means_u": (1, 25)},
    3: {"means_l": (1, 25), "quats": (1, 50), "scales": (2, 25), "sh0": (2, 25), "means_u": (1, 50)},
    4: {"means_l": (1, 25), "quats": (2, 100), "scales": (5, 75), "sh0": (5, 75), "means_u": (1, 75)},
    5: {"means_l": (1, 25), "quats": (6, 100), "scales": (5, 100), "sh0": (5, 100), "means_u": (2, 100)},
}  # fmt: skip
DEFAULT_EFFORT = 1
MAX_LEVEL = 2  # the coarsest precision level: 1 px at depth, about 38 dB in a viewer

_SQRT2 = math.sqrt(2.0)
# The three smaller components, in (w, x, y, z) order, for each index of the largest.
OTHER_COMPONENTS = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))
# The ZIP's image order, after meta.json (first, so that a streaming reader finds it at once).
_FILE_ORDER = ("means_l", "means_u", "scales", "quats", "sh0")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest DOS date: fixed, so the bytes are deterministic


def texture_size(n: int, grid: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """(width, height) of the images for n Gaussians.

    `grid` = (layers, rows, columns) with n Gaussians in that order gives width = columns and the
    layers stacked; None picks SHARP_GRID when n fits it, else a near-square image.
    """
    if n < 1:
        raise ValueError("SOG cannot hold zero Gaussians: there is nothing to lay out")
    if grid is None and n == math.prod(SHARP_GRID):
        grid = SHARP_GRID
    if grid is not None:
        layers, rows, columns = grid
        if min(grid) < 1 or layers * rows * columns != n:
            raise ValueError(f"grid {grid} does not hold {n} Gaussians")
        width, height = columns, layers * rows
    else:
        width = max(4, math.ceil(math.sqrt(n) / 4) * 4)
        height = -(-n // width)
    if width > MAX_TEXTURE_SIDE or height > MAX_TEXTURE_SIDE:
        raise ValueError(
            f"a {width} x {height} image exceeds WebP's {MAX_TEXTURE_SIDE} texels a side"
        )
    return width, height


def write_sog(
    gaussians: Gaussians,
    *,
    grid: tuple[int, int, int] | None = None,
    effort: int = DEFAULT_EFFORT,
    level: int | None = 0,
    focal_length_px: float | None = None,
) -> bytes:
    """Encode Gaussians (OpenCV axes, linear colours) as a bundled .sog, deterministically.

    grid: (layers, rows, columns) of the Gaussians' order; see `texture_size`.
    effort: a key of EFFORTS (0 fastest, 5 smallest).
    level: the precision level (engine.splats.formats.sog_precision): 0 the default, each
    level up doubles every tolerance; None fills the containers at their finest.
    focal_length_px: the input view's, so that positions can be held to its pixels.
    """
    if effort not in EFFORTS:
        raise ValueError(f"SOG effort must be one of {sorted(EFFORTS)}, got {effort}")
    if level is not None and not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"SOG precision level must be 0-{MAX_LEVEL} or None, got {level}")
    n = len(gaussians)
    width, height = texture_size(n, grid)
    settings = EFFORTS[effort]
    on_host = _on_host(gaussians.means.device)
    tolerance = (
        None
        if level is None
        else precision.spatial_tolerance(gaussians, focal_length_px=focal_length_px, level=level)
    )
    generator = (
        GENERATOR
        if level is None
        else f"{GENERATOR} ({precision.describe(level, focal_length_px)})"
    )
    with torch.no_grad(), ThreadPoolExecutor(min(len(settings), _cpu_count())) as pool:
        webps: dict[str, Future[bytes]] = {}
        values: dict[str, torch.Tensor] = {}
        for name, tensor in _quantize(gaussians, width * height, tolerance, level or 0):
            if tensor.dtype != torch.uint8:
                values[name] = tensor
            elif on_host:  # no transfer to wait for: encode each image while the next is made
                webps[name] = pool.submit(_webp, tensor.numpy(), width, height, *settings[name])
            else:
                values[name] = tensor
        host = _to_host(values)
        for name in settings:
            if name not in webps:
                webps[name] = pool.submit(_webp, host[name], width, height, *settings[name])
        meta = {
            "version": VERSION,
            "asset": {"generator": generator},
            "count": n,
            "means": {
                "mins": host["mins"].tolist(),
                "maxs": host["maxs"].tolist(),
                "files": FILES["means"],
            },
            "scales": {"codebook": host["scales_codebook"].tolist(), "files": FILES["scales"]},
            "quats": {"files": FILES["quats"]},
            "sh0": {"codebook": host["sh0_codebook"].tolist(), "files": FILES["sh0"]},
        }
        try:  # JSON has no NaN or infinity: such positions, scales or colours cannot be written
            meta_json = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            raise ValueError("SOG needs finite positions, scales and colours") from None
        images = [(f"{name}.webp", webps[name].result()) for name in _FILE_ORDER]
    return _zip([("meta.json", meta_json), *images])


def _on_host(device: torch.device) -> bool:
    return device.type == "cpu"


def _cpu_count() -> int:
    return getattr(os, "process_cpu_count", os.cpu_count)() or 1


# --- quantization (on the Gaussians' device) --------------------------------------------------


def _quantize(
    g: Gaussians, texels: int, tolerance: torch.Tensor | None, level: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor): each image as (texels, channels) uint8, the largest to encode first, and
    the float32 meta values (mins, maxs, scales_codebook, sh0_codebook). With a tolerance
    (metres, per Gaussian), every attribute is held to it (sog_precision), not finer.

    Works on (N,) component planes: the pipeline's (N, k) tensors are column-major views, whose
    columns are contiguous, and elementwise kernels on them are ~50x faster on the CPU than
    reductions along a strided row. In-place steps on fresh temporaries (never on the inputs)
    spare the CPU the page faults of a new 5-14 MB buffer per step, which cost more than the
    arithmetic.
    """
    pad = texels - len(g)

    def image(*channels: torch.Tensor) -> torch.Tensor:
        t = torch.stack(channels, dim=1)
        return torch.cat([t, t[-1:].expand(pad, -1)]) if pad else t

    low, high, mins, maxs = _positions(_planes(g.means), tolerance)
    yield "mins", mins
    yield "maxs", maxs
    yield "means_l", image(*low)
    quats = _quaternions(_planes(g.quaternions))
    if tolerance is not None:
        quats[:3] = precision.snap_rotation_bytes(quats[:3], g.scales, tolerance)
    yield "quats", image(*quats)
    tiny = torch.finfo(torch.float32).tiny
    log_scales = [s.clamp_min(tiny).log_() for s in _planes(g.scales)]
    codebook, labels = codebook_labels(log_scales)
    if tolerance is not None:
        allowed = precision.scale_allowance(log_scales, tolerance)
        labels = precision.snap_labels(codebook, labels, log_scales, allowed)
    yield "scales_codebook", codebook
    yield "scales", image(*labels)
    sh0 = [linear_to_srgb(c).sub_(0.5).div_(SH_C0) for c in _planes(g.colors)]
    codebook, labels = codebook_labels(sh0)
    if tolerance is not None:
        allowed = precision.color_allowance(g.opacities, level)
        labels = precision.snap_labels(codebook, labels, sh0, [allowed] * 3)
    yield "sh0_codebook", codebook
    alpha = (g.opacities.float().contiguous() * 255).round_().clamp_(0, 255).to(torch.uint8)
    yield "sh0", image(*labels, alpha)
    yield "means_u", image(*high)


def _planes(t: torch.Tensor) -> list[torch.Tensor]:
    # Contiguous planes whatever the input's layout: vectorised and strided kernels may round
    # differently, and the bytes must not depend on the layout.
    return [c.float().contiguous() for c in t.unbind(1)]


def _positions(
    axes: list[torch.Tensor], tolerance: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Low and high bytes per axis, and mins, maxs: (3,) float32 log-space range (one width)."""
    # tolerance / (1 + |p|): the tolerance in log space, d ln(1 + |p|) = dp / (1 + |p|)
    allowed = None if tolerance is None else [tolerance / (1 + p.abs()) for p in axes]
    logs = [p.abs().log1p_().copysign_(p) for p in axes]  # sign(p) ln(1 + |p|)
    extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in logs])  # (3, 2)
    mins = extremes[:, 0]
    maxs = mins + (extremes[:, 1] - mins).amax()
    # The readers scale by (maxs - mins), so quantize by exactly that float32 difference.
    scale = 65535 / (maxs - mins).clamp_min(torch.finfo(torch.float32).tiny)
    low, high = [], []
    for axis, (t, m, k) in enumerate(zip(logs, mins, scale)):
        t = t.sub_(m).mul_(k)
        if allowed is None:
            n = t.round_().clamp_(0, 65535).to(torch.int32)
        else:
            n = precision.snap_positions(t, allowed[axis].mul_(k))
        low.append(n.to(torch.uint8))  # the conversion keeps the low 8 bits
        high.append(n.bitwise_right_shift_(8).to(torch.uint8))
    return low, high, mins, maxs


def _quaternions(q: list[torch.Tensor]) -> list[torch.Tensor]:
    """Smallest-three bytes (R, G, B) and 252 + the largest's index (A) of (w, x, y, z) planes."""
    w, x, y, z = q
    norm = (w * w).addcmul_(x, x).addcmul_(y, y).addcmul_(z, z).sqrt_()
    zero = norm == 0
    w, norm = torch.where(zero, 1.0, w), torch.where(zero, 1.0, norm)  # zero -> the identity
    # The largest |component|, the first of equal maxima, and its value.
    largest = torch.zeros_like(w, dtype=torch.uint8)
    peak, value = w.abs(), w
    for index, c in enumerate((x, y, z), start=1):
        greater = c.abs() > peak
        largest = torch.where(greater, index, largest)
        peak = torch.maximum(peak, c.abs())
        value = torch.where(greater, c, value)
    # q and -q are one rotation: make the dropped component positive, as the reader assumes,
    # and fold that sign, the normalization and the byte scale into one factor.
    factor = torch.where(value < 0, -_SQRT2 * 127.5, _SQRT2 * 127.5) / norm
    others = (  # the three others in (w, x, y, z) order; see OTHER_COMPONENTS
        torch.where(largest == 0, x, w),
        torch.where(largest <= 1, y, x),
        torch.where(largest <= 2, z, y),
    )
    stored = [(c * factor).add_(127.5).round_().clamp_(0, 255).to(torch.uint8) for c in others]
    return [*stored, largest + 252]


def _to_host(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors as NumPy arrays, from one device-to-host copy of their concatenated bytes."""
    flat = [t.contiguous().view(torch.uint8).reshape(-1) for t in values.values()]
    host = torch.cat(flat).cpu().numpy() if flat else np.empty(0, np.uint8)
    arrays, offset = {}, 0
    for (name, t), f in zip(values.items(), flat):
        dtype = np.uint8 if t.dtype == torch.uint8 else np.float32
        arrays[name] = host[offset : offset + f.numel()].view(dtype).reshape(t.shape)
        offset += f.numel()
    return arrays


# --- WebP and ZIP -----------------------------------------------------------------------------


def _webp(texels: np.ndarray, width: int, height: int, method: int, quality: int) -> bytes:
    """Lossless WebP of (width * height, channels) uint8 texels, RGB or RGBA."""
    image = Image.fromarray(np.ascontiguousarray(texels).reshape(height, width, -1))
    buffer = io.BytesIO()
    # exact: keep the colour of texels whose alpha is 0 (opacity-0 Gaussians) as it is.
    image.save(buffer, "WEBP", lossless=True, method=method, quality=quality, exact=True)
    return buffer.getvalue()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    """A ZIP of the members, stored uncompressed, with fixed timestamps and attributes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.create_system = 3  # Unix, whichever system writes it
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()
