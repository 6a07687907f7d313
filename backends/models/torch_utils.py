"""Small helpers every torch-based model family shares (imported only by those families)."""

from __future__ import annotations

from typing import Any

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


#: Encoder sizes of the official segment-anything checkpoints (as in
#: ``segment_anything.build_sam``), shared by the segment-anything loader and the HF converter.
SAM_VIT_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": (2, 5, 8, 11),
    },
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (7, 15, 23, 31),
    },
}


def check_embedding_matches(image: np.ndarray, original_size: tuple[int, int]) -> None:
    """Refuse to decode an image against an embedding made for another image size."""
    if tuple(np.shape(image)[:2]) != tuple(original_size):
        raise ValueError(
            f"image is {np.shape(image)[:2]}, the embedding was made for {tuple(original_size)}"
        )
