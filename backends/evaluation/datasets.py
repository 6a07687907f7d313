"""Readers for the standard interactive-segmentation benchmarks, read as the official RITM
loaders (``isegm/data/datasets/{grabcut,berkeley,davis}.py``) read them:

* GrabCut: ``data_GT/<name>.{jpg,bmp,…}`` images, ``boundary_GT/<name>.bmp`` masks. Channel 0 of
  the mask decoded as colour: 255 object, 128 ignore band, 0 background.
* Berkeley: ``images/<name>.jpg``, ``masks/<name>.png``; RITM's ``BerkeleyDataset`` is its
  ``GrabCutDataset`` with other folder names, so the same rule.
* DAVIS: ``img/<name>.jpg``, ``gt/<name>.png``. The masks are palette PNGs whose object pixels are
  any non-zero index (dark red, RGB (128, 0, 0), in the standard palette): the maximum over the
  colour channels, every non-zero pixel object, no ignore band. Read the GrabCut way, channel 0
  of dark red is 0 in BGR order and 128 would be "ignore" in RGB order: no object at all.

Images are read as file bytes (what a tool would send); ground truth as int8 {1, 0, -1}. A sample
that cannot be read (no mask, unreadable file, no object pixel) comes back with ``error`` set, so
an evaluation reports it and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from backends.evaluation.clicker import ground_truth_from_label

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def _banded(label: np.ndarray) -> np.ndarray:
    """GrabCut/Berkeley: channel 0, 128 ignore, above 128 object."""
    return ground_truth_from_label(label[..., 0])


def _any_nonzero(label: np.ndarray) -> np.ndarray:
    """DAVIS: any non-zero channel is object; there is no ignore band."""
    return (label.max(axis=2) > 0).astype(np.int8)


@dataclass(frozen=True)
class Layout:
    images: str
    masks: str
    ground_truth: Callable[[np.ndarray], np.ndarray]  # BGR label image → int8 {1, 0, -1}


LAYOUTS = {
    "grabcut": Layout("data_GT", "boundary_GT", _banded),
    "berkeley": Layout("images", "masks", _banded),
    "davis": Layout("img", "gt", _any_nonzero),
}


@dataclass
class Sample:
    name: str
    image_bytes: bytes
    gt: np.ndarray  # int8: 1 object, 0 background, -1 ignore (empty when ``error`` is set)
    error: str | None = None


def detect_layout(root: Path) -> str:
    for name, layout in LAYOUTS.items():
        if (root / layout.images).is_dir() and (root / layout.masks).is_dir():
            return name
    known = "; ".join(f"{k}: {v.images}/ + {v.masks}/" for k, v in LAYOUTS.items())
    raise FileNotFoundError(f"{root}: not a known dataset layout ({known})")


def _mask_path(mask_dir: Path, stem: str) -> Path:
    for suffix in (".bmp", ".png", ".jpg", ".BMP", ".PNG"):
        path = mask_dir / f"{stem}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"no ground-truth mask for {stem} in {mask_dir}")


def read_ground_truth(path: Path, layout: str) -> np.ndarray:
    """One mask file as int8 ground truth, the way the official loader of ``layout`` reads it."""
    # Decoded as colour (palette expanded, grey replicated), exactly like the official cv2.imread.
    label = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if label is None:
        raise ValueError(f"cannot read mask {path.name}")
    gt = LAYOUTS[layout].ground_truth(label)
    if not (gt == 1).any():
        raise ValueError(f"mask {path.name} has no object pixel (read as {layout})")
    return gt


def iter_samples(root: str | Path, limit: int | None = None) -> Iterator[Sample]:
    """Every sample of a dataset folder; one that cannot be read has ``error`` set instead."""
    root = Path(root)
    layout = detect_layout(root)
    image_dir, mask_dir = root / LAYOUTS[layout].images, root / LAYOUTS[layout].masks
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in paths[:limit]:
        try:
            gt = read_ground_truth(_mask_path(mask_dir, path.stem), layout)
            yield Sample(path.name, path.read_bytes(), gt)
        except (OSError, ValueError) as exc:
            yield Sample(path.name, b"", np.zeros((0, 0), np.int8), f"{type(exc).__name__}: {exc}")


def load_samples(root: str | Path, limit: int | None = None) -> Iterator[Sample]:
    """Like ``iter_samples``, but a sample that cannot be read raises."""
    for sample in iter_samples(root, limit):
        if sample.error is not None:
            raise ValueError(f"{sample.name}: {sample.error}")
        yield sample
