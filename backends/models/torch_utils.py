"""Small helpers every torch-based model family shares (imported only by those families)."""

from __future__ import annotations

import numpy as np
import torch

from backends.errors import ImageError


def auto_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when present, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rgb(image: np.ndarray) -> np.ndarray:
    """An H×W×3 uint8 contiguous array (greyscale expanded, alpha dropped) or ``ImageError``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])
