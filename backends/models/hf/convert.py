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
from backends.models.torch_utils import SAM_VIT_ARCHITECTURES

#: segment-anything ViT sizes (one table, shared with ``backends.models.sam``).
OFFICIAL_ARCHITECTURES = SAM_VIT_ARCHITECTURES
_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"

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


def sam_config(architecture: Mapping[str, Any]) -> Any:
    """A transformers ``SamConfig`` for ``build_sam_from_config``-style sizes."""
    from transformers import SamConfig

    arch = dict(architecture)
    prompt_dim = int(arch.get("prompt_embed_dim", 256))
    image_size = int(arch.get("image_size", 1024))
    patch_size = int(arch.get("patch_size", 16))
    return SamConfig(
        vision_config={
            "hidden_size": int(arch["encoder_embed_dim"]),
            "num_hidden_layers": int(arch["encoder_depth"]),
            "num_attention_heads": int(arch["encoder_num_heads"]),
            "global_attn_indexes": [int(i) for i in arch["encoder_global_attn_indexes"]],
            "image_size": image_size,
            "patch_size": patch_size,
            "window_size": int(arch.get("window_size", 14)),
            "output_channels": prompt_dim,
            "num_pos_feats": prompt_dim // 2,
        },
        prompt_encoder_config={
            "hidden_size": prompt_dim,
            "image_size": image_size,
            "patch_size": patch_size,
            "mask_input_channels": int(arch.get("mask_in_chans", 16)),
        },
        mask_decoder_config={
            "hidden_size": prompt_dim,
            "num_hidden_layers": int(arch.get("decoder_depth", 2)),
            "mlp_dim": int(arch.get("decoder_mlp_dim", 2048)),
            "num_attention_heads": int(arch.get("decoder_num_heads", 8)),
            "iou_head_depth": int(arch.get("iou_head_depth", 3)),
            "iou_head_hidden_dim": int(arch.get("iou_head_hidden_dim", 256)),
            "num_multimask_outputs": int(arch.get("num_multimask_outputs", 3)),
        },
    )


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


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    weight = state_dict.get(_PATCH_EMBED_KEY)
    if weight is None or len(getattr(weight, "shape", ())) != 4:
        raise ModelLoadError(
            f"cannot tell the SAM variant: no {_PATCH_EMBED_KEY!r} tensor "
            "(is it a segment-anything checkpoint?)"
        )
    width = int(weight.shape[0])
    for arch in OFFICIAL_ARCHITECTURES.values():
        if arch["encoder_embed_dim"] == width:
            return dict(arch)
    raise ModelLoadError(
        f"cannot tell the SAM variant: image-encoder width {width} is none of 768/1024/1280 "
        "(vit_b/vit_l/vit_h); pass architecture=... for other sizes"
    )


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"SAM checkpoint {path} does not exist") from None
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load SAM checkpoint {path}: {exc} (only plain tensor state dicts; "
            "weights_only=True)"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"SAM checkpoint {path} is not a state dict of tensors")
    return dict(state)


def convert_sam_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    architecture: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a segment-anything state dict file into a ``SamModel`` directory ``dst``
    (``config.json``, ``model.safetensors``, processor configs) and return ``dst``.

    ``architecture``: ``build_sam_from_config`` sizes for a non-official model (tests); by
    default vit_b / vit_l / vit_h is read from the patch embedding's width.
    """
    from transformers import SamImageProcessor, SamModel, SamProcessor

    src_path, dst_path = Path(src).expanduser(), Path(dst).expanduser()
    state = _load_pth(src_path)
    arch = dict(architecture) if architecture is not None else infer_architecture(state)
    try:
        config = sam_config(arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"bad SAM architecture {arch!r}: {exc}") from exc
    converted = convert_state_dict(state)
    model = SamModel(config).eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{what}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ModelLoadError(
            f"{src_path} does not convert to the SamModel of {arch!r}: " + "; ".join(problems)
        )
    model.load_state_dict(converted, strict=True)
    dst_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst_path))
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(str(dst_path))
    return dst_path
