"""Image bytes → RGB uint8 arrays, the way annotation tools hand them over.

CVAT sends the original file (any format and PIL mode: L, LA, P, RGBA, I;16, CMYK…), Label
Studio a URL to it. Both show the image with its EXIF orientation applied, so clicks are in the
rotated frame: decode with the same rotation, or every click lands in the wrong place.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backends.errors import ImageError, ImageTooLarge
from backends.settings import MAX_PIXELS

#: Default largest image accepted, in pixels (50 MP). ``TAPMASK_MAX_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = int(MAX_PIXELS.default)


def max_pixels() -> int:
    return int(MAX_PIXELS)


def sha256(data: bytes) -> str:
    """The cache key of an image: hex sha256 of its file bytes."""
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Wide-range greyscale: scale to 8 bits by the range actually used, not by truncation.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros(arr.shape, np.uint8) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels have arbitrary colour underneath: composite on white like the tools.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, *, limit: int | None = None) -> np.ndarray:
    """Decode image file bytes to an H×W×3 uint8 RGB array, EXIF orientation applied.

    Raises ``ImageError`` for bytes that are not an image and ``ImageTooLarge`` for images over
    ``limit`` pixels (default ``max_pixels()``), checked from the header before decoding.
    """
    if not data:
        raise ImageError("empty image data")
    limit = max_pixels() if limit is None else limit
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below from the header; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limit:
                raise ImageTooLarge(
                    f"image is {width}×{height} = {width * height / 1e6:.1f} MP, "
                    f"over the limit of {limit / 1e6:.1f} MP (TAPMASK_MAX_PIXELS)"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.ascontiguousarray(np.asarray(_to_rgb(img), dtype=np.uint8))
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image ({len(data)} bytes): {exc}") from exc


def encode_png(image: np.ndarray) -> bytes:
    """RGB/greyscale array → PNG bytes (for tests, the CLI and tools that want a file)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


#: EXIF orientations that rotate by 90° (the displayed frame is the stored one transposed).
SWAPS_AXES = frozenset({5, 6, 7, 8})


def header(data: bytes) -> tuple[int, int, int]:
    """(stored height, stored width, EXIF orientation 1–8) from the header only (no decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image ({len(data)} bytes): {exc}") from exc
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # what exif_transpose does with a value it does not know
    return height, width, orientation


def size(data: bytes) -> tuple[int, int]:
    """(height, width) as ``decode`` would return it, read from the header only (no decode)."""
    height, width, orientation = header(data)
    return (width, height) if orientation in SWAPS_AXES else (height, width)
