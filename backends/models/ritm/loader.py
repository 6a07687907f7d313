"""Loading the official RITM checkpoint files (``{'state_dict': ..., 'config': ...}``).

The official training code saves ``config = {'class': 'isegm....HRNetModel', 'params': {name:
{'type', 'value', 'specified'}}}`` next to the weights, and its ``load_model`` rebuilds the
network from it: parameters that were not specified and are unknown are skipped, ``type ==
'class'`` values are class paths. We accept exactly the options the released HRNet checkpoints
use (and the simple variants of them), and refuse anything else with a clear error instead of
building a network that silently differs.

Unlike the official ``load_is_model``, which calls ``load_state_dict(strict=False)`` (so a wrong
architecture loads without complaint and runs with random weights), the weights load with
``strict=True`` and a mismatch raises :class:`ModelLoadError` naming the keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError
from backends.models.ritm.model import HRNetModel, RitmConfig

HRNET_CLASS = "isegm.model.is_hrnet_model.HRNetModel"
_BOOL_OPTIONS = (
    "small",
    "use_rgb_conv",
    "with_aux_output",
    "use_disks",
    "with_prev_mask",
    "use_leaky_relu",
    "binary_prev_mask",
    "conv_extend",
)
#: Options that only matter for training (learning-rate multipliers).
_TRAINING_ONLY = ("backbone_lr_mult",)
_SHOW_KEYS = 5


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    more = f", … (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return f"{len(keys)} [{shown}{more}]"


def config_from_checkpoint(config: Any, source: str = "checkpoint") -> RitmConfig:
    """Translate an official ``config`` dict into a :class:`RitmConfig`, refusing what we lack."""
    if not isinstance(config, Mapping) or "class" not in config or "params" not in config:
        raise ModelLoadError(f"{source}: 'config' is not an isegm model config (class/params)")
    if config["class"] != HRNET_CLASS:
        raise ModelLoadError(
            f"{source}: unsupported model class {config['class']!r}; "
            f"only {HRNET_CLASS} (the HRNet+OCR RITM models) is implemented"
        )
    params = config["params"]
    if not isinstance(params, Mapping):
        raise ModelLoadError(f"{source}: config['params'] is not a mapping")

    kwargs: dict[str, Any] = {}
    for name, entry in params.items():
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise ModelLoadError(f"{source}: config parameter {name!r} has no 'value'")
        value = entry["value"]
        specified = bool(entry.get("specified", True))
        if name in ("width", "ocr_width"):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < 0
                or (name == "width" and value == 0)
            ):
                raise ModelLoadError(f"{source}: bad {name}={value!r}")
            kwargs[name] = value
        elif name == "norm_radius":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"{source}: bad norm_radius={value!r}")
            kwargs[name] = value
        elif name in _BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise ModelLoadError(f"{source}: {name} must be a bool, got {value!r}")
            kwargs[name] = value
        elif name == "norm_mean_std":
            try:
                mean, std = (tuple(float(v) for v in part) for part in value)
            except (TypeError, ValueError):
                raise ModelLoadError(f"{source}: bad norm_mean_std={value!r}") from None
            if len(mean) != 3 or len(std) != 3:
                raise ModelLoadError(f"{source}: norm_mean_std must hold two 3-vectors")
            kwargs["norm_mean"], kwargs["norm_std"] = mean, std
        elif name == "norm_layer":
            if not str(value).endswith("BatchNorm2d"):
                raise ModelLoadError(
                    f"{source}: unsupported norm_layer {value!r} (only BatchNorm2d)"
                )
        elif name == "cpu_dist_maps":
            if value:
                raise ModelLoadError(
                    f"{source}: cpu_dist_maps=True (the Cython click encoder) is not supported"
                )
        elif name == "clicks_groups":
            if value is not None:
                raise ModelLoadError(f"{source}: clicks_groups={value!r} is not supported")
        elif name in _TRAINING_ONLY:
            continue
        elif specified:
            raise ModelLoadError(f"{source}: unsupported HRNetModel option {name}={value!r}")
        # An unspecified unknown parameter is skipped, as the official load_model does.
    return RitmConfig(**kwargs)


def build_model(config: RitmConfig, state_dict: Mapping[str, Any], source: str) -> HRNetModel:
    """Build the network for ``config`` and load ``state_dict`` strictly (eval mode, float32)."""
    model = HRNetModel(config)
    expected = set(model.state_dict().keys())
    given = set(state_dict.keys())
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: state_dict does not match the architecture {config}: "
            f"missing keys {_describe(missing)}; unexpected keys {_describe(unexpected)}"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # size mismatches, non-tensors
        raise ModelLoadError(f"{source}: cannot load state_dict: {exc}") from exc
    model.float().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[HRNetModel, RitmConfig]:
    """Read an official RITM ``.pth`` file and return the loaded network (CPU) and its config."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"RITM checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read RITM checkpoint {path}: {exc}") from exc
    if isinstance(checkpoint, list):
        raise ModelLoadError(
            f"{path}: a list of checkpoints (click-dependent model ensemble) is not supported"
        )
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ModelLoadError(f"{path}: not an official RITM checkpoint (no 'state_dict')")
    if "config" not in checkpoint:
        raise ModelLoadError(f"{path}: checkpoint has no 'config'; cannot tell the architecture")
    config = config_from_checkpoint(checkpoint["config"], str(path))
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ModelLoadError(f"{path}: 'state_dict' is not a mapping")
    return build_model(config, state_dict, str(path)), config
