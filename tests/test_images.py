"""Tests for engine.io.images: formats, colour modes, orientation, focal length, limits, errors."""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import time
import warnings
import zlib
from typing import Any

import numpy as np
import pillow_heif
import pytest
from conftest import GoldenCase
from PIL import Image, ImageCms, ImageFile, ImageOps, TiffImagePlugin

from engine.io.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    focal_length_px_from_35mm,
)

RED = (220, 30, 40)
BLUE = (20, 40, 200)
EXIF_IFD = 0x8769
ORIENTATION = 0x0112
FOCAL_LENGTH = 0x920A
FOCAL_LENGTH_35MM = 0xA405


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def two_halves(width: int = 32, height: int = 16) -> Image.Image:
    """Left half RED, right half BLUE: flat areas survive lossy codecs, halves catch flips."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def assert_halves(rgb: np.ndarray, tolerance: int) -> None:
    height, width = rgb.shape[:2]
    left = rgb[height // 2, width // 4].astype(int)
    right = rgb[height // 2, 3 * width // 4].astype(int)
    assert np.abs(left - RED).max() <= tolerance, left
    assert np.abs(right - BLUE).max() <= tolerance, right


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand, for bit depths Pillow cannot write and for lying headers."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def exif_with(ifd0: dict[int, Any] | None = None, exif_ifd: dict[int, Any] | None = None) -> bytes:
    """EXIF as bytes: Pillow's PNG writer drops an `Image.Exif` whose IFD0 is empty, and
    pillow-heif only turns an orientation given as bytes into HEIF transform boxes."""
    exif = Image.Exif()
    exif.update(ifd0 or {})
    if exif_ifd:
        exif.get_ifd(EXIF_IFD).update(exif_ifd)
    return exif.tobytes()


def linear_icc_profile(color_space: bytes) -> bytes:
    """A minimal ICC v2 display profile ("RGB " or "GRAY") with gamma-1.0 tone curves.

    Stored value 128 then means linear light 0.502, which is 188 in sRGB.
    """

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))

    def xyz_tag(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + xyz(x, y, z)

    text = b"linear test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100) + bytes(2)
    tags = {b"desc": desc, b"wtpt": xyz_tag(0.9642, 1.0, 0.8249)}
    if color_space == b"RGB ":  # sRGB primaries, adapted to D50
        tags |= {
            b"rXYZ": xyz_tag(0.4361, 0.2225, 0.0139),
            b"gXYZ": xyz_tag(0.3851, 0.7169, 0.0971),
            b"bXYZ": xyz_tag(0.1431, 0.0606, 0.7141),
            b"rTRC": curve,
            b"gTRC": curve,
            b"bTRC": curve,
        }
    else:
        tags[b"kTRC"] = curve
    data_start = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, tag in tags.items():
        tag += bytes(-len(tag) % 4)
        table += signature + struct.pack(">II", data_start + len(body), len(tag))
        body += tag
    header = (
        struct.pack(">I", data_start + len(body))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntr"
        + color_space
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + xyz(0.9642, 1.0, 0.8249)
        + bytes(48)
    )
    assert len(header) == 128
    return header + table + body


def decode_pixels(data: bytes) -> np.ndarray:
    decoded = decode_image(data)
    assert decoded.rgb.dtype == np.uint8
    assert decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3
    assert decoded.rgb.flags.c_contiguous and decoded.rgb.flags.writeable
    return decoded.rgb


def heif_encoder_missing() -> bool:
    return not pillow_heif.libheif_info().get("HEIF")


def avif_encode_error() -> str | None:
    try:
        encode(Image.new("RGB", (8, 8)), "AVIF")
    except Exception as exc:  # no libavif or no AV1 encoder in this Pillow build
        return str(exc)
    return None


AVIF_ENCODE_ERROR = avif_encode_error()


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "params", "expected_format", "tolerance"),
    [
        ("PNG", {}, "PNG", 0),
        ("BMP", {}, "BMP", 0),
        ("TIFF", {}, "TIFF", 0),
        ("TIFF", {"compression": "tiff_lzw"}, "TIFF", 0),
        ("GIF", {}, "GIF", 0),
        ("WEBP", {"lossless": True}, "WEBP", 0),
        ("WEBP", {"quality": 90}, "WEBP", 8),
        ("JPEG", {"quality": 95}, "JPEG", 4),
        ("MPO", {"save_all": True, "append_images": [Image.new("RGB", (32, 16))]}, "JPEG", 4),
    ],
)
def test_formats_decode_known_colors(
    image_format: str, params: dict[str, Any], expected_format: str, tolerance: int
) -> None:
    decoded = decode_image(encode(two_halves(), image_format, **params))
    assert decoded.format == expected_format
    assert (decoded.width, decoded.height) == (32, 16)
    assert_halves(decoded.rgb, tolerance)


@pytest.mark.skipif(heif_encoder_missing(), reason="this pillow-heif wheel has no HEIF encoder")
def test_heif_decodes_known_colors() -> None:
    decoded = decode_image(encode(two_halves(), "HEIF", quality=95))
    assert decoded.format == "HEIF"
    assert (decoded.width, decoded.height) == (32, 16)
    assert_halves(decoded.rgb, 10)


@pytest.mark.skipif(heif_encoder_missing(), reason="this pillow-heif wheel has no HEIF encoder")
def test_heif_orientation_is_applied_exactly_once() -> None:
    # pillow-heif turns the EXIF orientation into HEIF transform boxes when writing; libheif
    # applies those when reading and pillow-heif resets the EXIF tag to 1.
    data = encode(two_halves(), "HEIF", quality=95, exif=exif_with({ORIENTATION: 6}))
    rgb = decode_image(data).rgb
    assert rgb.shape == (32, 16, 3)  # rotated 90 degrees clockwise: left half is now on top
    assert np.abs(rgb[4, 8].astype(int) - RED).max() <= 10
    assert np.abs(rgb[28, 8].astype(int) - BLUE).max() <= 10


@pytest.mark.skipif(AVIF_ENCODE_ERROR is not None, reason=f"cannot write AVIF: {AVIF_ENCODE_ERROR}")
def test_avif_decodes_known_colors_and_orientation() -> None:
    data = encode(two_halves(), "AVIF", quality=95, exif=exif_with({ORIENTATION: 8}))
    decoded = decode_image(data)
    assert decoded.format == "AVIF"
    assert decoded.rgb.shape == (32, 16, 3)  # rotated 90 degrees counter-clockwise
    assert np.abs(decoded.rgb[28, 8].astype(int) - RED).max() <= 10
    assert np.abs(decoded.rgb[4, 8].astype(int) - BLUE).max() <= 10


@pytest.mark.parametrize(
    ("image_format", "params"), [("GIF", {"duration": 50}), ("WEBP", {"lossless": True})]
)
def test_animation_decodes_first_frame(image_format: str, params: dict[str, Any]) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], image_format, save_all=True, append_images=frames[1:], **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (decode_pixels(data) == RED).all()


# ---------------------------------------------------------------------------------------------
# Colour modes
# ---------------------------------------------------------------------------------------------


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (2, 2), 0)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def two_rows(row: list[Any], dtype: Any) -> np.ndarray:
    """The same row twice: images need at least 2 pixels on each side."""
    return np.array([row, row], dtype)


def gray_rgb(row: list[int]) -> np.ndarray:
    return np.repeat(two_rows(row, np.uint8)[..., None], 3, axis=2)


def png16(color_type: int, row: list[int], width: int) -> bytes:
    """A two-row 16-bit PNG (Pillow cannot write 16-bit RGB or gray + alpha)."""
    scanline = b"\0" + struct.pack(f">{len(row)}H", *row)
    return raw_png(width, 2, 16, color_type, scanline * 2)


SIXTEEN_BIT = [0, 255, 256, 32768, 65280, 65535]
SIXTEEN_BIT_AS_8 = [0, 0, 1, 128, 255, 255]  # v >> 8
PALETTE_RGB = np.array([[RED, RED], [RED, BLUE]], np.uint8)

MODE_CASES = {
    "L": (lambda: encode(Image.new("L", (2, 2), 77), "PNG"), gray_rgb([77, 77])),
    "1": (
        lambda: encode(Image.fromarray(two_rows([True, False], bool)), "PNG"),
        gray_rgb([255, 0]),
    ),
    "P": (lambda: encode(palette_image(None), "PNG"), PALETTE_RGB),
    # The transparent entry keeps its palette colour: alpha is dropped, not composited.
    "P with transparency": (lambda: encode(palette_image(1), "PNG"), PALETTE_RGB),
    "P with transparency, GIF": (lambda: encode(palette_image(0), "GIF"), PALETTE_RGB),
    "LA": (lambda: encode(Image.new("LA", (2, 2), (100, 7)), "PNG"), gray_rgb([100, 100])),
    "RGBA": (
        lambda: encode(Image.new("RGBA", (2, 2), (10, 20, 30, 0)), "PNG"),
        np.full((2, 2, 3), (10, 20, 30), np.uint8),
    ),
    "RGBA, TIFF": (
        lambda: encode(Image.new("RGBA", (2, 2), (*RED, 128)), "TIFF"),
        np.full((2, 2, 3), RED, np.uint8),
    ),
    "CMYK, TIFF": (
        lambda: encode(
            Image.fromarray(two_rows([(0, 255, 255, 0), (0, 0, 0, 128)], np.uint8), "CMYK"), "TIFF"
        ),
        two_rows([(255, 0, 0), (127, 127, 127)], np.uint8),
    ),
    "I;16, PNG": (
        lambda: encode(Image.fromarray(two_rows(SIXTEEN_BIT, np.uint16)), "PNG"),
        gray_rgb(SIXTEEN_BIT_AS_8),
    ),
    "I;16B, TIFF": (
        lambda: encode(Image.fromarray(two_rows(SIXTEEN_BIT, ">u2")), "TIFF"),
        gray_rgb(SIXTEEN_BIT_AS_8),
    ),
    "I, TIFF, clipped to 16 bits": (
        lambda: encode(
            Image.fromarray(two_rows([-5, 0, 4660, 65535, 70000], np.int32), "I"), "TIFF"
        ),
        gray_rgb([0, 0, 18, 255, 255]),
    ),
    "RGB 16-bit, PNG": (
        lambda: png16(2, [65535, 32768, 257, 0, 255, 65280], width=2),
        two_rows([(255, 128, 1), (0, 0, 255)], np.uint8),
    ),
    "LA 16-bit, PNG": (lambda: png16(4, [51400, 0, 256, 65535], width=2), gray_rgb([200, 1])),
    "F in 0..1": (
        lambda: encode(
            Image.fromarray(two_rows([0.0, 0.5, 1.0, -0.2, np.nan], np.float32)), "TIFF"
        ),
        gray_rgb([0, 128, 255, 0, 0]),
    ),
    "F in 0..255": (
        lambda: encode(Image.fromarray(two_rows([0.0, 127.6, 255.0, 300.0], np.float32)), "TIFF"),
        gray_rgb([0, 128, 255, 255]),
    ),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_modes_become_exact_8bit_rgb(case: str) -> None:
    make, expected = MODE_CASES[case]
    np.testing.assert_array_equal(decode_pixels(make()), expected)


def test_cmyk_jpeg_is_not_inverted() -> None:
    # Pillow writes Adobe (inverted) CMYK JPEGs, like Photoshop; red must come back red.
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = decode_pixels(data)
    assert np.abs(rgb[8, 8].astype(int) - (255, 0, 0)).max() <= 3


# ---------------------------------------------------------------------------------------------
# ICC profiles
# ---------------------------------------------------------------------------------------------


def test_srgb_and_broken_profiles_leave_pixels_untouched() -> None:
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, b"not an icc profile" * 10):
        data = encode(Image.fromarray(pixels), "PNG", icc_profile=profile)
        np.testing.assert_array_equal(decode_pixels(data), pixels)


@pytest.mark.parametrize(("mode", "color_space"), [("RGB", b"RGB "), ("L", b"GRAY")])
def test_non_srgb_profile_is_converted_to_srgb(mode: str, color_space: bytes) -> None:
    image = Image.new(mode, (4, 4), (128, 128, 128) if mode == "RGB" else 128)
    data = encode(image, "PNG", icc_profile=linear_icc_profile(color_space))
    rgb = decode_pixels(data).astype(int)
    assert np.abs(rgb - 188).max() <= 2, rgb[0, 0]


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------


# The upright picture for each EXIF orientation, from the tag's definition of where the stored
# row 0 and column 0 go (written with numpy, independently of Pillow's transpose names).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize(
    ("image_format", "params"), [("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]
)
def test_all_exif_orientations(orientation: int, image_format: str, params: dict[str, Any]) -> None:
    stored = (np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5).astype(np.uint8)
    exif = exif_with({ORIENTATION: orientation})
    data = encode(Image.fromarray(stored), image_format, exif=exif, **params)
    np.testing.assert_array_equal(decode_pixels(data), UPRIGHT[orientation](stored))


def test_jpeg_orientation() -> None:
    data = encode(two_halves(), "JPEG", quality=95, exif=exif_with({ORIENTATION: 6}))
    rgb = decode_pixels(data)
    assert rgb.shape == (32, 16, 3)
    assert np.abs(rgb[4, 8].astype(int) - RED).max() <= 4
    assert np.abs(rgb[28, 8].astype(int) - BLUE).max() <= 4


def test_invalid_orientation_is_ignored() -> None:
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    data = encode(Image.fromarray(stored), "PNG", exif=exif_with({ORIENTATION: 9}))
    np.testing.assert_array_equal(decode_pixels(data), stored)


# ---------------------------------------------------------------------------------------------
# Focal length
# ---------------------------------------------------------------------------------------------


def test_focal_length_px_from_35mm_formula() -> None:
    assert focal_length_px_from_35mm(36.0, 36, 24) == pytest.approx(36.0, rel=1e-12)
    expected = 26 * math.sqrt(4000**2 + 3000**2) / math.sqrt(36**2 + 24**2)
    assert focal_length_px_from_35mm(26, 4000, 3000) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("ifd0", "exif_ifd", "f_35mm", "source"),
    [
        ({}, {FOCAL_LENGTH_35MM: 26}, 26.0, "exif_35mm"),
        ({}, {FOCAL_LENGTH_35MM: 26, FOCAL_LENGTH: 50.0}, 26.0, "exif_35mm"),
        ({}, {FOCAL_LENGTH_35MM: 0, FOCAL_LENGTH: 50.0}, 50.0, "exif_focal_length"),
        ({}, {FOCAL_LENGTH: TiffImagePlugin.IFDRational(17, 4)}, 4.25 * 8.4, "exif_focal_length"),
        ({}, {FOCAL_LENGTH: 9.99}, 9.99 * 8.4, "exif_focal_length"),
        ({}, {FOCAL_LENGTH: 10.0}, 10.0, "exif_focal_length"),
        ({}, {FOCAL_LENGTH: 0.0}, 30.0, "default"),
        ({}, {}, 30.0, "default"),
        ({FOCAL_LENGTH_35MM: 28}, {}, 28.0, "exif_35mm"),
        ({FOCAL_LENGTH: 35.0}, {}, 35.0, "exif_focal_length"),
        ({FOCAL_LENGTH_35MM: 28}, {FOCAL_LENGTH_35MM: 52}, 28.0, "exif_35mm"),  # IFD0 wins
    ],
)
@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_focal_length_from_exif(
    ifd0: dict[int, Any], exif_ifd: dict[int, Any], f_35mm: float, source: str, image_format: str
) -> None:
    data = encode(Image.new("RGB", (60, 40)), image_format, exif=exif_with(ifd0, exif_ifd))
    decoded = decode_image(data)
    assert decoded.focal_length_source == source
    assert decoded.focal_length_px == pytest.approx(
        f_35mm * math.sqrt(60**2 + 40**2) / math.sqrt(36**2 + 24**2), rel=1e-12
    )


def test_focal_length_uses_upright_size() -> None:
    data = encode(
        Image.new("RGB", (60, 40)), "PNG", exif=exif_with({ORIENTATION: 6}, {FOCAL_LENGTH_35MM: 24})
    )
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (40, 60)
    assert decoded.focal_length_px == pytest.approx(
        focal_length_px_from_35mm(24, 40, 60), rel=1e-12
    )


def test_focal_length_override_wins() -> None:
    data = encode(Image.new("RGB", (60, 40)), "JPEG", exif=exif_with({}, {FOCAL_LENGTH_35MM: 26}))
    decoded = decode_image(data, focal_length_px=1234.5)
    assert (decoded.focal_length_px, decoded.focal_length_source) == (1234.5, "override")
    assert decode_image(data, focal_length_px=np.float32(100)).focal_length_px == 100.0


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "35", True, [100.0]])
def test_invalid_focal_length_override(bad: Any) -> None:
    with pytest.raises(ValueError, match="focal_length_px"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), focal_length_px=bad)


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (100_000, 100_000),  # beyond Pillow's own hard limit: its DecompressionBombError
        (10_000, 10_000),  # in Pillow's warning band
        (7_000, 7_000),  # below Pillow's limits, above ours
    ],
)
def test_huge_declared_size_fails_fast(width: int, height: int) -> None:
    # The header lies: there is no pixel data, so decoding would fail with a different message.
    data = raw_png(width, height, 8, 2)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        with pytest.raises(ImageDecodeError, match=r"pixels.*downscale"):
            decode_image(data)
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_inclusive_and_configurable() -> None:
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert decode_image(data, max_pixels=5_000).width == 100
    with pytest.raises(ImageDecodeError, match="100x50 = 5,000 pixels, above the limit of 4,999"):
        decode_image(data, max_pixels=4_999)
    assert DEFAULT_MAX_PIXELS == 40_000_000


@pytest.mark.parametrize("bad", [0, -5, 1.5, None, True])
def test_invalid_max_pixels(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), max_pixels=bad)


@pytest.mark.parametrize("size", [(1, 10), (10, 1)])
def test_too_small_image(size: tuple[int, int]) -> None:
    with pytest.raises(ImageDecodeError, match="at least 2 pixels"):
        decode_image(encode(Image.new("RGB", size), "PNG"))


def test_zero_size_header() -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(raw_png(0, 10, 8, 2))


# ---------------------------------------------------------------------------------------------
# Bad bytes
# ---------------------------------------------------------------------------------------------

ACCEPTED = "send JPEG, PNG, WebP, HEIC/HEIF, AVIF, TIFF, BMP or GIF"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"empty.*" + ACCEPTED),
        (np.random.default_rng(0).bytes(4096), r"not an image.*" + ACCEPTED),
        (b"hello, this is plain text, not a photo\n" * 20, r"not an image.*" + ACCEPTED),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
        (b"P6\n4 4\n255\n" + bytes(48), "unsupported image format 'PPM'; " + ACCEPTED),
        (encode(Image.new("RGB", (4, 4)), "ICO"), "unsupported image format 'ICO'"),
        (raw_png(8, 8, 8, 2, b"\0" * 10)[:40], "PNG"),
    ],
)
def test_bad_bytes_raise_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.parametrize(("image_format", "params"), [("JPEG", {"quality": 90}), ("PNG", {})])
def test_truncated_images_are_errors(image_format: str, params: dict[str, Any]) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), image_format, **params)
    with pytest.raises(
        ImageDecodeError, match=f"{image_format} pixel data is truncated or corrupt"
    ):
        decode_image(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_bytes_like_inputs_and_type_check() -> None:
    data = encode(Image.new("RGB", (4, 4), RED), "PNG")
    for view in (bytearray(data), memoryview(data)):
        assert (decode_image(view).rgb == RED).all()
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def fuzz_sources() -> list[tuple[str, bytes]]:
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    exif = exif_with({ORIENTATION: 6}, {FOCAL_LENGTH_35MM: 26})
    sources = [
        ("JPEG", encode(noise, "JPEG", exif=exif)),
        ("PNG", encode(noise, "PNG", exif=exif)),
        ("WEBP", encode(noise, "WEBP", exif=exif)),
        ("TIFF", encode(noise, "TIFF", exif=exif)),
        ("BMP", encode(noise, "BMP")),
        ("GIF", encode(noise, "GIF")),
    ]
    if not heif_encoder_missing():
        sources.append(("HEIF", encode(noise, "HEIF", exif=exif)))
    return sources


# Pillow warns about the damaged metadata it skips; only exceptions matter here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("name", "data"), fuzz_sources(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_damaged_files_never_leak_other_exceptions(name: str, data: bytes) -> None:
    rng = np.random.default_rng(3)
    damaged = [data[:cut] for cut in np.linspace(1, len(data) - 1, 12, dtype=int)]
    for _ in range(12):
        flipped = bytearray(data)
        for position in rng.integers(0, len(data), 4):
            flipped[position] ^= 0xFF
        damaged.append(bytes(flipped))
    for variant in damaged:
        try:
            decoded = decode_image(variant)
        except ImageDecodeError:
            continue
        assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape[2] == 3, name


# ---------------------------------------------------------------------------------------------
# Result type
# ---------------------------------------------------------------------------------------------


def test_decoded_image_is_frozen_with_size_properties() -> None:
    decoded = decode_image(encode(Image.new("RGB", (7, 5)), "PNG"))
    assert isinstance(decoded, DecodedImage)
    assert (decoded.width, decoded.height) == (7, 5)
    assert decoded.focal_length_source == "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.format = "JPEG"  # type: ignore[misc]


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(ImageDecodeError, ValueError)


# ---------------------------------------------------------------------------------------------
# Parity with the reference loader (golden fixtures)
# ---------------------------------------------------------------------------------------------


def test_golden_parity(golden_case: GoldenCase) -> None:
    input_path = golden_case.input_path
    expected = golden_case.expected()
    decoded = decode_image(input_path.read_bytes())

    assert decoded.height == int(expected["image_height"])
    assert decoded.width == int(expected["image_width"])
    assert decoded.focal_length_px == pytest.approx(float(expected["focal_length_px"]), rel=1e-9)
    # Plain Pillow decoding, turned upright, alpha sliced off: what the reference feeds the model.
    with Image.open(input_path) as reference:
        reference_rgb = np.asarray(ImageOps.exif_transpose(reference))[..., :3]
    np.testing.assert_array_equal(decoded.rgb, reference_rgb)
