"""Reading dataset images: which files count as images, what their headers say (size, mode,
orientation, animation) without decoding, a cheap check that the data is complete, and
`load_rgb`, the one way the studio turns any image into RGB pixels.

Integrity check ("quick", the default), chosen to stay fast on thousands of files:
- PNG ends with its IEND chunk, JPEG with its EOI marker (FF D9), GIF with its trailer (3B),
  WebP's RIFF header declares no more bytes than the file holds. One 64-byte read of the tail.
  A cut file fails this, so it is confirmed by a decode (JPEG at 1/8 scale via `draft`), which
  also clears files that merely carry trailing data (e.g. a video appended after a JPEG's EOI).
- Other formats (BMP, TIFF, TGA...) are decoded in full: they are rare and mostly uncompressed.
"full" decodes every image; "none" trusts the headers."""

from __future__ import annotations

import functools
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import DatasetError

log = logging.getLogger(__name__)

CheckLevel = Literal["none", "quick", "full"]
DEFAULT_MAX_PIXELS = 100_000_000  # a 10000x10000 image; anything larger is treated as a bomb
WHITE = (255, 255, 255)

# Everything a decoder may raise on a damaged file; anything else escaping is a bug.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

PRIMARY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif")
# Registered by Pillow but not images a dataset holds: stubs without a decoder, formats that need
# an external program (Ghostscript, Windows), video containers.
_NOT_DATASET_EXTENSIONS = frozenset(
    {".bufr", ".grib", ".h5", ".hdf", ".eps", ".ps", ".emf", ".wmf", ".mpeg", ".mpg", ".pdf"}
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_EXIF_ORIENTATION = 0x0112


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions treated as images: the usual ones plus every format Pillow can open."""
    registered = Image.registered_extensions()  # imports Pillow's plugins once
    openable = {ext for ext, fmt in registered.items() if fmt in Image.OPEN}
    return frozenset(PRIMARY_EXTENSIONS) | (openable - _NOT_DATASET_EXTENSIONS)


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in image_extensions()


@dataclass(frozen=True)
class ImageHeader:
    width: int  # displayed size: EXIF orientation applied
    height: int
    format: str
    mode: str
    orientation: int  # EXIF orientation, 1 = as stored
    animated: bool
    has_transparency: bool  # an alpha channel or palette / tRNS transparency

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(im: Image.Image) -> ImageHeader:
    """What an opened (not loaded) image declares. Cheap: no pixel data is decoded."""
    width, height = im.size
    orientation = _orientation(im)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    try:
        animated = bool(getattr(im, "is_animated", False))
    except DECODE_ERRORS:  # a GIF cut inside its first frame: reported by the integrity check
        animated = False
    return ImageHeader(
        width=width,
        height=height,
        format=im.format or "",
        mode=im.mode,
        orientation=orientation,
        animated=animated,
        has_transparency=im.mode in _ALPHA_MODES or im.has_transparency_data,
    )


def _orientation(im: Image.Image) -> int:
    # PNG keeps EXIF in an eXIf chunk; Pillow only sees it before the pixel data without decoding,
    # and its getexif() would decode the image to look further.
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except DECODE_ERRORS:  # a malformed EXIF block: the image itself may be fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def mode_notes(header: ImageHeader) -> list[tuple[str, str]]:
    """(kind, message) warnings for images `load_rgb` converts in a way the user should know."""
    notes = []
    if header.mode == "CMYK":
        notes.append(("mode", "CMYK image: converted to RGB when loaded"))
    elif header.mode in _WIDE_GRAY_MODES or header.mode == "F":
        notes.append(("mode", f"{header.mode} (high bit depth) image: scaled down to 8 bits when loaded"))
    if header.has_transparency:
        what = "palette transparency" if header.mode in ("P", "PA") else "transparency"
        notes.append(("alpha", f"{header.mode} image with {what}: composited onto white when loaded"))
    if header.animated:
        notes.append(("animated", "animated image: only the first frame is used"))
    return notes


# -- integrity -------------------------------------------------------------------------------


def find_damage(im: Image.Image, fh: BinaryIO, file_size: int, level: CheckLevel = "quick") -> str | None:
    """None if the image data looks complete, else what is wrong (e.g. 'image file is truncated').
    `im` is opened from `fh` and not yet loaded; it is loaded when a decode is needed."""
    if level == "none":
        return None
    if level == "quick" and _tail_looks_complete(im.format, fh, file_size):
        return None
    return _decode_error(im)


def _tail_looks_complete(fmt: str | None, fh: BinaryIO, file_size: int) -> bool:
    if fmt == "WEBP":
        fh.seek(0)
        riff = fh.read(12)
        return len(riff) == 12 and struct.unpack("<I", riff[4:8])[0] + 8 <= file_size
    if fmt not in ("PNG", "JPEG", "MPO", "GIF"):
        return False
    fh.seek(max(0, file_size - 64))
    tail = fh.read().rstrip(b"\x00")
    if fmt == "PNG":
        return tail.endswith(b"IEND\xaeB`\x82")
    if fmt == "GIF":
        return tail.endswith(b";")
    return tail.endswith(b"\xff\xd9")


def _decode_error(im: Image.Image) -> str | None:
    if im.format in ("JPEG", "MPO"):  # decode at 1/8 scale: every byte is still read, 8x less work
        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
    try:
        im.load()
    except DECODE_ERRORS as exc:
        return str(exc) or type(exc).__name__
    return None


# -- pixels ----------------------------------------------------------------------------------


def load_rgb(
    path: str | Path,
    background: tuple[int, int, int] = WHITE,
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode any dataset image to an 8-bit RGB image, as it should be seen:
    - EXIF orientation applied; the first frame of an animation;
    - alpha (RGBA, LA, PA), palette transparency and tRNS colour keys composited onto `background`;
    - 16-bit grayscale scaled to 8 bits (v * 255 / 65535, rounded), not clipped as Pillow's
      convert("L") does; CMYK converted through its ICC profile when it has one, else by Pillow's
      (255 - C) * (255 - K) / 255 formula.
    `draft_size` lets JPEG decode at a reduced scale no smaller than that size (for thumbnails and
    hashes). Raises DatasetError for files that are not images, are damaged, or exceed `max_pixels`."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise DatasetError(
                    f"{path.name} declares {im.width}x{im.height} pixels, over the limit of "
                    f"{max_pixels:,}: downscale it before adding it to the dataset"
                )
            if draft_size is not None and im.format in ("JPEG", "MPO"):
                im.draft(im.mode, draft_size)
            im.load()
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright, background)
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path.name} is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path.name} is not an image Pillow can read") from None
    except DECODE_ERRORS as exc:
        raise DatasetError(f"{path.name} cannot be decoded ({exc}): re-export or remove it") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """A new RGB image from a loaded image of any mode (see `load_rgb` for the rules)."""
    if im.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_rgb(np.asarray(im), 65535)
    if im.mode == "F":
        values = np.asarray(im)
        scale = 1.0 if values.size and float(values.max()) <= 1.0 else 255.0
        return _wide_gray_to_rgb(values, scale)
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode in _ALPHA_MODES or im.has_transparency_data:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")  # RGB (a copy), L, 1, P without transparency, YCbCr, RGBX...


def _wide_gray_to_rgb(values: np.ndarray, full_scale: float) -> Image.Image:
    if full_scale == 65535:
        wide = np.clip(values.astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    else:
        gray = np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        from io import BytesIO

        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
        except ImageCms.PyCMSError as exc:
            log.warning("CMYK ICC profile unusable (%s): converting with Pillow's formula", exc)
    return im.convert("RGB")
