"""Small helpers every torch-based model family shares (imported only by those families)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from backends.errors import ImageError, ModelLoadError


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


def first_few(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, and how many there are when that is not all."""
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items)} in all)" if len(items) > n else "")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a plain state dict (segment-anything's ``.pth`` files) onto the CPU, refusing pickled
    code (``weights_only=True``) and anything that is not a mapping of names to tensors."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"SAM checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for bad files (UnpicklingError, IndexError…)
        raise ModelLoadError(
            f"cannot load SAM checkpoint {path}: {exc}".strip()
            + " (only plain tensor state dicts are accepted; weights_only=True)"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ModelLoadError(
            f"SAM checkpoint {path} is not a state dict of tensors (got {type(state).__name__})"
        )
    return dict(state)


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps ``given`` from loading strictly into a model whose state dict is ``expected``:
    missing, unexpected and mis-shaped keys, one message part each (empty: it loads)."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key} {tuple(given[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in given and tuple(given[key].shape) != tuple(expected[key].shape)
    ]
    parts = (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs model)", mismatched),
    )
    return [f"{what}: {first_few(keys)}" for what, keys in parts if keys]
