"""Splat file formats behind one entry point: `encode(gaussians, "spz", ...)`.

  * "ply": the 3DGS .ply that most tools read (engine.splats.formats.ply): 14 float32 (56 bytes) a Gaussian.
  * "spz": Niantic's compressed format (engine.splats.formats.spz): 20 bytes a Gaussian before
    compression, about 4x smaller than the .ply after it; quantized (positions to 0.24 mm).
  * "splat": antimatter15's 32-byte rows (engine.splats.formats.splat): exact positions and scales,
    8-bit colours and rotations; 1.75x smaller than the .ply.
  * "sog": PlayCanvas's SOG v2 (engine.splats.formats.sog): a ZIP of lossless WebP images laid out
    in SHARP's pixel grid, the smallest (about 7.5 bytes a Gaussian, ~8x smaller than the .ply);
    16-bit log-space positions, 256-entry codebooks for scales and colours.

None of them has a registered media type, so all are served as application/octet-stream. A
.spz of version 2-3 is itself a gzip file: serve it as is, without Content-Encoding: gzip, or
HTTP clients will unpack it before the viewer sees it. A .sog is a ZIP archive whose members are
stored uncompressed; the viewers unpack it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.splats.formats.sog import write_sog
from engine.splats.formats.splat import write_splat
from engine.splats.formats.spz import DEFAULT_VERSION, write_spz
from engine.splats.gaussians import Gaussians

FORMATS: tuple[str, ...] = ("ply", "spz", "splat", "sog")
MEDIA_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class EncodedSplat:
    data: bytes
    format: str  # one of FORMATS
    media_type: str
    extension: str  # with the dot, like Path.suffix: ".spz"


def encode(
    gaussians: Gaussians,
    format: str,
    *,
    image_width: int,
    image_height: int,
    focal_length_px: float,
    ply_layout: str = "standard",
    spz_version: int = DEFAULT_VERSION,
) -> EncodedSplat:
    """Encode Gaussians (OpenCV axes, linear colours) in one of FORMATS.

    The image size and focal length are metadata only the .ply stores; each format's
    module docstring says how it maps axes and colours. Any tensor layout gives the same bytes.
    """
    gaussians = gaussians.contiguous()  # the pipeline's tensors are strided views
    if format == "ply":
        from engine.splats.formats.ply import (
            write_ply,  # engine.splats.formats.ply owns the .ply layouts
        )

        data = write_ply(
            gaussians,
            image_width=image_width,
            image_height=image_height,
            focal_length_px=focal_length_px,
            layout=ply_layout,
        )
    elif format == "spz":
        data = write_spz(gaussians, version=spz_version)
    elif format == "splat":
        data = write_splat(gaussians)
    elif format == "sog":
        # SHARP's grid layout when all 2 x 768 x 768 are there; positions held to a fraction
        # of the input view's pixels (engine.splats.formats.sog_precision)
        data = write_sog(gaussians, focal_length_px=focal_length_px)
    else:
        raise ValueError(f"unknown splat format {format!r}; choose one of {', '.join(FORMATS)}")
    return EncodedSplat(data=data, format=format, media_type=MEDIA_TYPE, extension=f".{format}")
