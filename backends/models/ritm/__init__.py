"""RITM (Sofiiuk et al., "Reviving Iterative Training with Mask Guidance for Interactive
Segmentation"): HRNet+OCR click models, numerically equivalent to the official SamsungLabs
``ritm_interactive_segmentation`` code (network, NoBRS predictor with zoom-in and flip).

``build(name, checkpoint=None, device=None, **options)`` is the registry factory. Checkpoint
resolution: the ``checkpoint`` argument, else ``$RITM_CHECKPOINT``, else
``$TAPMASK_MODELS_DIR/<default_checkpoint>`` (``TAPMASK_MODELS_DIR`` defaults to
``~/.cache/tapmask/models``). Files are the official releases (``coco_lvis_h18_itermask.pth``,
``coco_lvis_h18s_itermask.pth``, ``coco_lvis_h32_itermask.pth``, ``sbd_h18_itermask.pth``…).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError
from backends.models.ritm.loader import load_checkpoint
from backends.models.ritm.model import OFFICIAL_CONFIGS, HRNetModel, RitmConfig
from backends.models.ritm.predictor import NetClick, PredictorState, RitmPredictor, ZoomParams
from backends.models.ritm.segmenter import RitmSegmenter, RitmState
from backends.models.torch_utils import auto_device
from backends.weights import models_dir

__all__ = [
    "HRNetModel",
    "NetClick",
    "PredictorState",
    "RitmConfig",
    "RitmPredictor",
    "RitmSegmenter",
    "RitmState",
    "ZoomParams",
    "build",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "coco_lvis_h18_itermask.pth"
#: Expected (width, small) of the registry variants, to warn when a checkpoint does not match.
VARIANTS = {"h18": (18, False), "h18s": (18, True), "h32": (32, False)}


def resolve_checkpoint(
    checkpoint: str | os.PathLike[str] | None, default_checkpoint: str = DEFAULT_CHECKPOINT
) -> Path:
    """The checkpoint argument, else ``$RITM_CHECKPOINT``, else the models dir default."""
    if checkpoint:
        return Path(checkpoint).expanduser()
    env = os.environ.get("RITM_CHECKPOINT")
    if env:
        return Path(env).expanduser()
    return models_dir() / default_checkpoint


def build(
    name: str = "ritm",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    default_checkpoint: str = DEFAULT_CHECKPOINT,
    variant: str | None = None,
    max_size: int | None = None,
    with_flip: bool = True,
    zoom_target: int = 400,
    prob_thresh: float = 0.49,
    random_weights: bool = False,
    **options: Any,
) -> RitmSegmenter:
    """Load an official RITM checkpoint and wrap it as a :class:`RitmSegmenter`.

    ``device``: None picks CUDA when available. ``max_size``: optional longest-side limit of the
    network input (None = official behaviour). ``with_flip``, ``zoom_target`` (the zoom-in
    ``target_size``) and ``prob_thresh`` default to the official evaluation settings.
    ``random_weights=True`` builds the official architecture of ``variant`` untrained and reads
    no file (benchmarks); it must be asked for, it is never a fallback.
    """
    if options:
        raise ModelLoadError(f"{name}: unknown RITM options {sorted(options)}")
    predictor_options = {
        "prob_thresh": prob_thresh,
        "with_flip": with_flip,
        "zoom_in": ZoomParams(target_size=zoom_target),
        "max_size": max_size,
    }
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        config = OFFICIAL_CONFIGS.get(variant or "h18")
        if config is None:
            raise ModelLoadError(f"{name}: no official RITM architecture {variant!r}")
        net = HRNetModel(config).eval()
        return _segmenter(name, net, config, None, device, predictor_options)
    path = resolve_checkpoint(checkpoint, default_checkpoint)
    if not path.is_file():
        raise ModelLoadError(
            f"{name}: RITM checkpoint not found: {path} (download the official "
            f"{default_checkpoint} from the SamsungLabs/ritm_interactive_segmentation releases "
            "into $TAPMASK_MODELS_DIR, or set RITM_CHECKPOINT)"
        )
    net, config = load_checkpoint(path)
    if variant in VARIANTS and (config.width, config.small) != VARIANTS[variant]:
        log.warning(
            "%s: checkpoint %s is width=%s small=%s, not the %s architecture",
            name,
            path,
            config.width,
            config.small,
            variant,
        )
    return _segmenter(name, net, config, path, device, predictor_options)


def _segmenter(
    name: str,
    net: HRNetModel,
    config: RitmConfig,
    path: Path | None,
    device: str | torch.device | None,
    options: dict[str, Any],
) -> RitmSegmenter:
    predictor = RitmPredictor(net, auto_device(device), **options)
    return RitmSegmenter(name, predictor, config, path)
