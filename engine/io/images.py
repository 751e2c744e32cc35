"""Image input: client bytes in, an upright 8-bit RGB array and a focal length in pixels out.

`decode_image` is the only way untrusted image bytes enter the service. It

* identifies the format from the content (never from a file name) and accepts JPEG, PNG,
  WebP, HEIC/HEIF (through pillow-heif), AVIF, TIFF, BMP and GIF (first frame);
* checks the declared size against a pixel cap before any pixel data is decoded;
* reduces every Pillow mode (palette, gray, bilevel, gray + alpha, CMYK, 16-bit, 32-bit
  integer, float, ...) to 8-bit RGB. Alpha is dropped, not composited, exactly as the SHARP
  reference loader does, so an RGBA pixel keeps the RGB values it stores;
* converts to sRGB when the file embeds an ICC profile that is not sRGB (iPhone photos are
  often Display P3, print files CMYK); sRGB-tagged and untagged images are left bit-exact;
* applies all eight EXIF orientations (the reference only handles 3, 6 and 8);
* derives the focal length in pixels from EXIF with the reference's rules, and keeps every
  focal length, given or derived, within a physical range for the image's size (a diagonal
  field of view of MIN_DIAGONAL_FOV_DEG to MAX_DIAGONAL_FOV_DEG).

Every failure caused by the bytes themselves is raised as `ImageDecodeError`, a `ValueError`
whose message says what was wrong and what is accepted, so that a request handler can return
it to the client verbatim.

16-bit samples are reduced to 8 bits by keeping the high byte (``v >> 8``). Pillow itself does
this when it opens 16-bit RGB(A) PNG and TIFF files, so every 16-bit source is reduced the
same way; it maps 0 to 0 and 65535 to 255 and neither clips nor wraps.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from PIL import Image, ImageCms

from engine.settings import DEFAULT_MAX_PIXELS

try:  # absent where only torch, numpy and Pillow are installed (benchmarks/gpu_check.py)
    import pillow_heif
except ImportError:  # pragma: no cover
    pillow_heif = None

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "FocalLengthError",
    "ImageDecodeError",
    "decode_image",
    "focal_length_px_from_35mm",
    "focal_length_range_px",
]

LOGGER = logging.getLogger(__name__)

if pillow_heif is not None:
    pillow_heif.register_heif_opener()

MIN_SIDE_PX: Final[int] = 2

# Pillow plugin ids tried, in this order. A JPEG carrying extra pictures (MPF, common on
# phones and cameras) opens through the JPEG plugin but reports itself as "MPO".
_OPEN_FORMATS: Final = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "TIFF", "BMP", "GIF")
_FORMAT_ALIASES: Final = {"MPO": "JPEG"}
_ACCEPTED: Final = "send JPEG, PNG, WebP, HEIC/HEIF, AVIF, TIFF, BMP or GIF"

_TAG_ORIENTATION: Final = 0x0112
_TAG_EXIF_IFD: Final = 0x8769
_TAG_FOCAL_LENGTH: Final = 0x920A
_TAG_FOCAL_LENGTH_35MM: Final = 0xA405

# Focal length rules of the reference loader.
_DEFAULT_FOCAL_35MM: Final = 30.0
_SMALL_SENSOR_BELOW_MM: Final = 10.0
_SMALL_SENSOR_CROP: Final = 8.4

# Accepted focal lengths, as the diagonal field of view they give: 1 degree is a 2,479 mm lens
# on 35 mm film (beyond any telephoto photographers carry), 160 degrees a 3.8 mm one (wider
# than any rectilinear lens; fisheyes are not pinhole cameras). Outside it, the network's
# depth scale is meaningless and the splat's numbers overflow or vanish.
MIN_DIAGONAL_FOV_DEG: Final = 1.0
MAX_DIAGONAL_FOV_DEG: Final = 160.0

# The stored image is turned upright by these transposes; EXIF orientation 1 is the identity.
_ORIENTATION_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# ICC colour space signature expected for each 8-bit mode that `_to_8bit` produces.
_ICC_COLOR_SPACES: Final = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}
_SRGB_PROFILE: Final = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class ImageDecodeError(ValueError):
    """The image bytes cannot be used; the message is meant for the client."""


class FocalLengthError(ImageDecodeError):
    """The focal length given for the image is not a physical one; meant for the client."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright 8-bit RGB image and the focal length the model should assume for it."""

    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous, EXIF orientation applied
    focal_length_px: float
    # "override" | "exif_35mm" | "exif_focal_length" | "default", followed by a note in
    # parentheses when out-of-range EXIF values were skipped
    focal_length_source: str
    format: str  # Pillow's format name: "JPEG", "PNG", "WEBP", "HEIF", "AVIF", ...

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def focal_length_px_from_35mm(f_35mm: float, width: int, height: int) -> float:
    """Convert a 35 mm-equivalent focal length to pixels by matching image and film diagonals."""
    # Same operation order as the reference, so golden focal lengths match to the last bit.
    return float(f_35mm) * math.sqrt(width**2 + height**2) / math.sqrt(36**2 + 24**2)


def focal_length_range_px(width: int, height: int) -> tuple[float, float]:
    """The shortest and longest accepted focal lengths, in pixels, for an image this size."""
    half_diagonal = math.hypot(width, height) / 2
    return (
        half_diagonal / math.tan(math.radians(MAX_DIAGONAL_FOV_DEG) / 2),
        half_diagonal / math.tan(math.radians(MIN_DIAGONAL_FOV_DEG) / 2),
    )


def decode_image(
    data: bytes,
    *,
    focal_length_px: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    focal_length_field: str = "focal_length_px",
) -> DecodedImage:
    """Decode image bytes into an upright 8-bit RGB array with its focal length in pixels.

    Args:
        data: The encoded image (bytes, bytearray or memoryview).
        focal_length_px: Focal length in pixels of the upright image; overrides EXIF when given.
        max_pixels: Largest accepted width x height, checked before pixel data is decoded.
            Pillow's own decompression-bomb ceiling (``2 * Image.MAX_IMAGE_PIXELS``) still
            applies above it.
        focal_length_field: How the caller's user names ``focal_length_px``, for messages.

    Raises:
        ImageDecodeError: The bytes are empty, corrupt, truncated, of an unsupported format or
            colour mode, too small or too large.
        FocalLengthError: ``focal_length_px`` is not a number or out of range for the image.
        ValueError: ``max_pixels`` is invalid.
        TypeError: ``data`` is not bytes-like.
    """
    override = (
        None
        if focal_length_px is None
        else _checked_focal_length(focal_length_px, focal_length_field)
    )
    _check_max_pixels(max_pixels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"the image data is empty; {_ACCEPTED}")

    with _open(data, max_pixels) as image:
        image_format = _FORMAT_ALIASES.get(image.format, image.format)
        _check_size(image.size, max_pixels)
        _load(image, image_format)
        # Read EXIF only now: Pillow's TIFF loader applies the orientation itself while
        # loading and drops the tag, which must not be applied a second time.
        tags = _exif_tags(image)
        upright = _to_srgb(_to_8bit(image), image.info.get("icc_profile"))
        transpose = _orientation_transpose(tags.get(_TAG_ORIENTATION))
        if transpose is not None:
            upright = upright.transpose(transpose)
        rgb = np.array(upright, dtype=np.uint8)  # a writable, C-contiguous copy

    height, width = rgb.shape[:2]
    if override is not None:
        _check_focal_range(override, focal_length_field, width, height)
        focal_px, source = override, "override"
    else:
        focal_px, source = _focal_length_from_exif(tags, width, height)
    return DecodedImage(
        rgb=rgb, focal_length_px=focal_px, focal_length_source=source, format=image_format
    )


def _checked_focal_length(value: Any, field: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if math.isfinite(number) and number > 0:
            return number
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
    raise FocalLengthError(f"{field} must be a positive number of pixels, got {shown}")


def _check_focal_range(focal_px: float, field: str, width: int, height: int) -> None:
    low, high = focal_length_range_px(width, height)
    if not low <= focal_px <= high:
        raise FocalLengthError(
            f"{field}={focal_px:g} is out of range for this {width}x{height} image: give "
            f"{low:,.1f} to {high:,.0f} pixels, a diagonal field of view of "
            f"{MAX_DIAGONAL_FOV_DEG:g} to {MIN_DIAGONAL_FOV_DEG:g} degrees "
            f"(a {_lens_35mm(MAX_DIAGONAL_FOV_DEG):.1f} to "
            f"{_lens_35mm(MIN_DIAGONAL_FOV_DEG):,.0f} mm lens on 35 mm film), or leave it "
            "out to use the photo's EXIF"
        )


def _lens_35mm(diagonal_fov_deg: float) -> float:
    return math.hypot(36, 24) / 2 / math.tan(math.radians(diagonal_fov_deg) / 2)


def _check_max_pixels(value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {value!r}")


def _open(data: bytes | bytearray | memoryview, max_pixels: int) -> Image.Image:
    """Parse the header only (Pillow decodes pixels lazily), restricted to accepted formats."""
    try:
        with warnings.catch_warnings():
            # Our own cap, checked right after opening, decides; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            "the image declares more pixels than can be decoded safely; "
            f"at most {max_pixels:,} are accepted, downscale it and send it again"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified_message(data)) from exc
    except Exception as exc:  # a plugin that accepted the signature choked on the header
        raise ImageDecodeError(
            f"the image header is corrupt ({exc}); re-export the image and send it again"
        ) from exc


def _unidentified_message(data: bytes | bytearray | memoryview) -> str:
    """Name the format if Pillow knows it but we do not accept it, for a clearer message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                other_format = image.format
    except Exception:
        return f"the data is not an image in a supported format ({len(data):,} bytes); {_ACCEPTED}"
    return f"unsupported image format {other_format!r}; {_ACCEPTED}"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE_PX:
        raise ImageDecodeError(
            f"the image is {width}x{height} pixels; each side must be at least {MIN_SIDE_PX} pixels"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}; downscale it and send it again"
        )


def _load(image: Image.Image, image_format: str) -> None:
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt pixel data, in any plugin's own words
        raise ImageDecodeError(
            f"the {image_format} pixel data is truncated or corrupt ({exc}); "
            "re-export the image and send it again"
        ) from exc


def _exif_tags(image: Image.Image) -> dict[int, Any]:
    """EXIF tags of IFD0 merged over the Exif sub-IFD (IFD0 wins, as in the reference)."""
    try:
        exif = image.getexif()
        return {**exif.get_ifd(_TAG_EXIF_IFD), **exif}
    except Exception as exc:  # broken metadata must not reject a decodable photo
        LOGGER.warning("ignoring unreadable EXIF metadata: %s", exc)
        return {}


def _focal_length_from_exif(tags: dict[int, Any], width: int, height: int) -> tuple[float, str]:
    """The first of the reference's candidates within the accepted range, in pixels.

    A candidate outside the range is skipped, and its value noted in the source: it is a
    corrupt or forged tag, not a lens.
    """
    low, high = focal_length_range_px(width, height)
    notes = []
    chosen = (focal_length_px_from_35mm(_DEFAULT_FOCAL_35MM, width, height), "default")
    for f_35mm, source, tag, raw in _focal_length_candidates(tags):
        focal_px = focal_length_px_from_35mm(f_35mm, width, height)
        if low <= focal_px <= high:
            chosen = (focal_px, source)
            break
        notes.append(f"EXIF {tag} of {raw:g} mm ignored as out of range")
    focal_px, source = chosen
    return focal_px, f"{source} ({'; '.join(notes)})" if notes else source


def _focal_length_candidates(tags: dict[int, Any]) -> Iterator[tuple[float, str, str, float]]:
    """(35 mm equivalent, source, EXIF tag name, tag value) in the reference's order."""
    f_35mm = _exif_number(tags.get(_TAG_FOCAL_LENGTH_35MM))
    if f_35mm is not None and f_35mm > 0:
        yield f_35mm, "exif_35mm", "FocalLengthIn35mmFilm", f_35mm
    # Unlike the reference, a zero FocalLength (unknown) falls through to the default
    # instead of producing a zero focal length.
    f_mm = _exif_number(tags.get(_TAG_FOCAL_LENGTH))
    if f_mm is not None and f_mm > 0:
        # A FocalLength this short is taken to be a phone lens, scaled by a phone crop factor.
        scaled = f_mm * _SMALL_SENSOR_CROP if f_mm < _SMALL_SENSOR_BELOW_MM else f_mm
        yield scaled, "exif_focal_length", "FocalLength", f_mm


def _exif_number(value: Any) -> float | None:
    """A finite float from an EXIF value (int, IFDRational, ...); None if absent or malformed."""
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


def _orientation_transpose(orientation: Any) -> Image.Transpose | None:
    if isinstance(orientation, int):
        return _ORIENTATION_TRANSPOSE.get(orientation)
    return None


def _to_8bit(image: Image.Image) -> Image.Image:
    """Reduce any mode to 8-bit "RGB", "L" or "CMYK" in the same colour space, alpha dropped."""
    mode = image.mode
    if mode in _ICC_COLOR_SPACES:
        return image
    if mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_sixteen_bit_to_8bit(np.asarray(image)))
    if mode == "F":
        return Image.fromarray(_float_to_8bit(np.asarray(image)))
    try:
        # "1", "LA", "La" stay gray; "P", "PA", "RGBA", "RGBa", "RGBX", "YCbCr", "HSV", ...
        # become RGB. Pillow drops alpha here without compositing.
        return image.convert("L" if mode in ("1", "LA", "La") else "RGB")
    except ValueError as exc:
        raise ImageDecodeError(
            f"unsupported colour mode {mode!r}; send an RGB, gray, palette or CMYK image"
        ) from exc


def _sixteen_bit_to_8bit(values: np.ndarray) -> np.ndarray:
    # Mode "I" holds 32-bit integers but only 16-bit samples in practice (PNG, TIFF, PGM).
    return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float gray: 0..1 if no sample exceeds 1 (float TIFF convention), else Pillow's 0..255."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    scale = 255.0 if values.max() <= 1.0 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """Convert an 8-bit "RGB", "L" or "CMYK" image to sRGB RGB, honouring a non-sRGB profile."""
    profile = _foreign_profile(icc_profile, image.mode)
    if profile is None:
        return image.convert("RGB")
    try:
        return ImageCms.profileToProfile(image, profile, _SRGB_PROFILE, outputMode="RGB")
    except ImageCms.PyCMSError as exc:  # a profile lcms cannot use: keep the stored values
        LOGGER.warning("ignoring unusable ICC profile: %s", exc)
        return image.convert("RGB")


def _foreign_profile(icc_profile: bytes | None, mode: str) -> ImageCms.ImageCmsProfile | None:
    """The embedded profile if it is readable, fits the mode and is not already sRGB."""
    if not icc_profile:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (OSError, ImageCms.PyCMSError) as exc:
        LOGGER.warning("ignoring unreadable ICC profile: %s", exc)
        return None
    if profile.profile.xcolor_space != _ICC_COLOR_SPACES[mode]:
        return None
    if "srgb" in (profile.profile.profile_description or "").lower():
        return None
    return profile
