"""Readers for the standard interactive-segmentation benchmarks (the layouts RITM uses).

* GrabCut: ``data_GT/<name>.{jpg,bmp,…}`` images, ``boundary_GT/<name>.bmp`` masks (255 object,
  128 ignore band, 0 background).
* Berkeley: ``images/<name>.jpg``, ``masks/<name>.png``.
* DAVIS: ``img/<name>.jpg``, ``gt/<name>.png``.

Images are read as file bytes (what a tool would send); ground truth as int8 {1, 0, -1}.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from backends.evaluation.clicker import ground_truth_from_label

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
LAYOUTS = {  # name: (image folder, mask folder)
    "grabcut": ("data_GT", "boundary_GT"),
    "berkeley": ("images", "masks"),
    "davis": ("img", "gt"),
}


@dataclass
class Sample:
    name: str
    image_bytes: bytes
    gt: np.ndarray  # int8: 1 object, 0 background, -1 ignore


def detect_layout(root: Path) -> str:
    for layout, (images, masks) in LAYOUTS.items():
        if (root / images).is_dir() and (root / masks).is_dir():
            return layout
    known = "; ".join(f"{k}: {i}/ + {m}/" for k, (i, m) in LAYOUTS.items())
    raise FileNotFoundError(f"{root}: not a known dataset layout ({known})")


def _mask_path(mask_dir: Path, stem: str) -> Path:
    for suffix in (".bmp", ".png", ".jpg", ".BMP", ".PNG"):
        path = mask_dir / f"{stem}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"no ground-truth mask for {stem} in {mask_dir}")


def load_samples(root: str | Path, limit: int | None = None) -> Iterator[Sample]:
    root = Path(root)
    image_dir, mask_dir = (root / part for part in LAYOUTS[detect_layout(root)])
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in paths[:limit]:
        label = cv2.imread(str(_mask_path(mask_dir, path.stem)), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise ValueError(f"cannot read mask for {path.name}")
        yield Sample(path.name, path.read_bytes(), ground_truth_from_label(label))
