"""The frame Label Studio declares (``original_width`` × ``original_height``) vs the decoded image.

Label Studio puts clicks in percent of the image as the browser shows it and reports that
image's natural size; brush regions must be drawn at exactly that size. Usually it is the size
``images.decode`` gives (both apply the EXIF orientation). When it is not:

* **over ``TAPMASK_MAX_PIXELS``** → 413 ``declared_size_too_large``, before any download (a
  declared 100000 × 100000 would otherwise mean a 10 GB brush mask);
* **a scaled copy** (same aspect ratio within 1 %, plus half a pixel of rounding per side):
  percent → pixels of the decoded image, and the mask is resized to the declared size;
* **the stored frame of an EXIF-rotated file** (declared = decoded with width and height swapped,
  and the file's EXIF orientation is one that swaps them): the browser showed the stored pixels
  without applying the rotation, so clicks are mapped through the orientation onto the decoded
  image and the mask is mapped back (then scaled, if it is also a scaled copy). A mirroring
  orientation (2, 3, 4) keeps the size and cannot be told apart: it is taken as applied;
* **anything else** (another aspect ratio: not the same picture) → 422
  ``declared_size_mismatch`` naming both sizes, rather than drawing a stretched mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from backends.errors import DeclaredSizeMismatch, DeclaredSizeTooLarge
from backends.images import SWAPS_AXES
from backends.settings import MAX_PIXELS

#: Relative aspect-ratio difference still taken as the same picture (resizers round).
ASPECT_TOLERANCE = 0.01

# Stored-frame (u, v) in [0, 1] → displayed-frame (u, v), per EXIF orientation (what PIL's
# ``exif_transpose`` does to pixels), and the numpy inverse taking a displayed mask back.
_TO_DISPLAYED = {
    5: lambda u, v: (v, u),
    6: lambda u, v: (1.0 - v, u),
    7: lambda u, v: (1.0 - v, 1.0 - u),
    8: lambda u, v: (v, 1.0 - u),
}
_TO_STORED = {
    5: lambda m: m.T,
    6: lambda m: np.rot90(m, 1),
    7: lambda m: m[::-1, ::-1].T,
    8: lambda m: np.rot90(m, -1),
}
_FROM_STORED = {
    5: lambda m: m.T,
    6: lambda m: np.rot90(m, -1),
    7: lambda m: m.T[::-1, ::-1],
    8: lambda m: np.rot90(m, 1),
}


def check_declared_size(width: int, height: int) -> None:
    """Refuse a declared size whose pixel count passes ``TAPMASK_MAX_PIXELS`` (no work done)."""
    limit = int(MAX_PIXELS)
    if width * height > limit:
        raise DeclaredSizeTooLarge(
            f"original_width × original_height = {_size(width, height)} is "
            f"{_megapixels(width * height)} MP, over the {limit / 1e6:g} MP limit "
            "(TAPMASK_MAX_PIXELS)"
        )


def _megapixels(pixels: int) -> str:
    text = str(pixels // 1_000_000)  # integers: 1e300 × 1e300 is too large for a float
    return text if len(text) <= 12 else f"{text[0]}.{text[1:3]}e{len(text) - 1}"


def _size(width: int, height: int) -> str:
    text = f"{width}×{height}"
    return text if len(text) <= 60 else f"{text[:60]}…"


def _same_shape(width: int, height: int, image_width: int, image_height: int) -> bool:
    """True when ``width × height`` is ``image_width × image_height`` scaled (and rounded)."""
    cross = abs(width * image_height - height * image_width)
    slack = ASPECT_TOLERANCE * width * image_height + (image_width + image_height) / 2
    return cross <= slack


@dataclass(frozen=True)
class Frame:
    """How the declared frame maps onto the decoded image (see the module docstring)."""

    width: int  # declared
    height: int
    image_width: int  # decoded (EXIF applied)
    image_height: int
    orientation: int = 1  # not 1: the declared frame is the stored one, rotated by this

    @property
    def kind(self) -> str:
        if self.orientation != 1:
            return "stored"
        same = (self.width, self.height) == (self.image_width, self.image_height)
        return "same" if same else "scaled"

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Declared-frame pixel-edge coordinates → decoded-image pixel-edge coordinates."""
        u, v = x / self.width, y / self.height
        if self.orientation != 1:
            u, v = _TO_DISPLAYED[self.orientation](u, v)
        return u * self.image_width, v * self.image_height

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A decoded-image mask → the declared frame (boolean ``height × width``)."""
        if self.orientation != 1:
            mask = np.ascontiguousarray(_TO_STORED[self.orientation](mask))
        if mask.shape != (self.height, self.width):
            resized = cv2.resize(
                mask.astype(np.uint8), (self.width, self.height), interpolation=cv2.INTER_NEAREST
            )
            return resized.astype(bool)
        return mask

    def to_image(self, mask: np.ndarray) -> np.ndarray:
        """A declared-frame mask (a region Label Studio stored) → the decoded image
        (boolean ``image_height × image_width``): the inverse of ``mask``."""
        mask = np.asarray(mask, dtype=bool)
        stored = (self.image_height, self.image_width)
        if self.orientation != 1:
            stored = (self.image_width, self.image_height)
        if mask.shape != stored:
            mask = cv2.resize(
                mask.astype(np.uint8), stored[::-1], interpolation=cv2.INTER_NEAREST
            ).astype(bool)
        if self.orientation != 1:
            mask = np.ascontiguousarray(_FROM_STORED[self.orientation](mask))
        return mask


def frame_for(
    width: int, height: int, image_height: int, image_width: int, orientation: int = 1
) -> Frame:
    """The mapping for a declared ``width × height`` onto a decoded image, or 422."""
    check_declared_size(width, height)
    if _same_shape(width, height, image_width, image_height):
        return Frame(width, height, image_width, image_height)
    if orientation in SWAPS_AXES and _same_shape(width, height, image_height, image_width):
        return Frame(width, height, image_width, image_height, orientation)
    rotated = " (its EXIF orientation swaps width and height)" if orientation in SWAPS_AXES else ""
    raise DeclaredSizeMismatch(
        f"original_width × original_height = {_size(width, height)} cannot be this image, "
        f"which is {image_width}×{image_height}{rotated}: neither its size, a scaled copy, nor "
        "its stored frame; was the task's image replaced after it was opened?"
    )
