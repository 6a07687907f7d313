"""segment-anything checkpoints (``sam_vit_*.pth`` state dicts) → transformers ``SamModel``
directories, for the ``sam-hf-*`` models (``tapmask weights --convert SRC DIR``).

The installed transformers ships no ``convert_sam_to_hf.py``, so the key mapping lives here. It is
the one transformers used to convert Meta's files for ``facebook/sam-vit-*``: module renames
(``image_encoder`` → ``vision_encoder``, ``blocks`` → ``layers``, ``norm*`` → ``layer_norm*``,
``neck.{0,1,2,3}`` → ``neck.{conv1,layer_norm1,conv2,layer_norm2}``, the prompt encoder's
``mask_downscaling`` Sequential → ``mask_embed.{conv,layer_norm}*``, ``output_upscaling`` →
``upscale_*``) and segment-anything's MLP ``layers.{0..n-1}`` → transformers'
``proj_in`` / ``layers.{0..n-3}`` / ``proj_out``. The random Fourier matrix of the prompt encoder
is shared with the image-wide positional embedding.

The checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code); the converted
model is loaded strictly (every key, every shape) and saved as safetensors with the processor's
config, so ``build("sam-hf-vit-b", checkpoint=DIR)`` loads it like a hub download.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError
from backends.models.sizes import SAM_VIT_SIZES, SamArchitecture, sam_variant
from backends.models.torch_utils import load_state_dict_file, state_dict_mismatches

#: Plain substring renames, applied in order to every key.
_RENAMES: tuple[tuple[str, str], ...] = (
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_MLP = re.compile(r"^(.*\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.")
_SHARED_PE = "shared_image_embedding.positional_embedding"
_PROMPT_PE = "prompt_encoder.shared_embedding.positional_embedding"


def convert_key(key: str, mlp_depths: Mapping[str, int]) -> str:
    """One segment-anything key → its transformers name (``mlp_depths``: layers per MLP)."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    match = _MLP.match(key)
    if match:
        prefix, index = match.group(1), int(match.group(2))
        depth = mlp_depths[prefix]
        if index == 0:
            part = "proj_in"
        elif index == depth - 1:
            part = "proj_out"
        else:
            part = f"layers.{index - 1}"
        key = f"{prefix}.{part}." + key[match.end() :]
    return key


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segment-anything ``Sam`` state dict → ``SamModel`` keys (same tensors)."""
    state = {k: v for k, v in state_dict.items() if k not in ("pixel_mean", "pixel_std")}
    renamed_plain = {key: _rename_only(key) for key in state}
    depths: dict[str, int] = {}
    for key in renamed_plain.values():
        match = _MLP.match(key)
        if match:
            depths[match.group(1)] = max(depths.get(match.group(1), 0), int(match.group(2)) + 1)
    converted = {convert_key(key, depths): value for key, value in state.items()}
    if _PROMPT_PE in converted:
        converted[_SHARED_PE] = converted[_PROMPT_PE]
    return converted


def _rename_only(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def convert_sam_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    architecture: SamArchitecture | Mapping[str, Any] | None = None,
) -> Path:
    """Convert a segment-anything state dict file into a ``SamModel`` directory ``dst``
    (``config.json``, ``model.safetensors``, processor configs) and return ``dst``.

    ``architecture``: ``SamArchitecture`` sizes for a non-official model (tests); by default
    vit_b / vit_l / vit_h is read from the patch embedding's width.
    """
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    src_path, dst_path = Path(src).expanduser(), Path(dst).expanduser()
    state = load_state_dict_file(src_path)
    arch = (
        SamArchitecture.of(architecture)
        if architecture is not None
        else SAM_VIT_SIZES[sam_variant(state)]
    )
    converted = convert_state_dict(state)
    model = SamModel(SamConfig(**arch.hf_config())).eval()
    problems = state_dict_mismatches(model.state_dict(), converted)
    if problems:
        raise ModelLoadError(
            f"{src_path} does not convert to the SamModel of {arch}: " + "; ".join(problems)
        )
    model.load_state_dict(converted, strict=True)
    dst_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst_path))
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(str(dst_path))
    return dst_path
