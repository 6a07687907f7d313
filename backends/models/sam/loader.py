"""Building segment-anything SAM models (``sam``, ``sam-vit_b``, ``sam-vit_l``, ``sam-vit_h``).

Checkpoints are plain state dicts (as Meta publishes them). They are loaded on the CPU with
``weights_only=True`` (segment-anything's own builder calls ``torch.load`` without a
``map_location``, which fails for a GPU-saved file on a CPU box, and unpickles arbitrary objects),
then strictly, so a wrong or truncated file is an error naming the offending keys rather than a
model that silently produces garbage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from backends.errors import ModelLoadError
from backends.models.sam.backbone import SegmentAnythingBackbone
from backends.models.sam.core import ExportingSamSegmenter
from backends.models.sizes import SAM_VIT_SIZES, SamArchitecture, sam_variant
from backends.models.torch_utils import load_state_dict_file, state_dict_mismatches
from backends.weights import OFFICIAL_WEIGHTS, models_dir


def build_sam_model(architecture: SamArchitecture | Mapping[str, Any]) -> Sam:
    """``segment_anything.build_sam._build_sam`` with every size configurable (random weights):
    ``SAM_VIT_SIZES`` gives the official models, tiny values give fast test models."""
    arch = SamArchitecture.of(architecture)
    if arch.image_size % arch.patch_size:
        raise ValueError(
            f"image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}"
        )
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(arch.embedding_size, arch.embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def _construct(architecture: SamArchitecture | Mapping[str, Any]) -> Sam:
    try:
        return build_sam_model(architecture)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelLoadError(f"bad SAM architecture {architecture!r}: {exc}") from exc


def load_weights(model: Sam, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """``load_state_dict(strict=True)`` with a clear error for missing/extra/mis-shaped keys."""
    where = f" {source}" if source else ""
    problems = state_dict_mismatches(model.state_dict(), state_dict)
    if problems:
        raise ModelLoadError(
            f"SAM checkpoint{where} does not match the model: " + "; ".join(problems)
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # anything the checks above did not foresee
        raise ModelLoadError(f"SAM checkpoint{where} does not match the model: {exc}") from exc


def default_checkpoint(model_type: str | None) -> Path:
    """``$SAM_CHECKPOINT``, else the official file for ``model_type`` in ``models_dir()``.

    Without a model type (registry name ``sam``) the largest official file present is used
    (vit_h, then vit_l, then vit_b); if none is, the vit_h path is returned (and reported missing).
    """
    env = os.environ.get("SAM_CHECKPOINT")
    if env:
        return Path(env).expanduser()
    directory = models_dir()
    if model_type is not None:
        return directory / OFFICIAL_WEIGHTS[f"sam-{model_type}"].filename
    candidates = [
        directory / OFFICIAL_WEIGHTS[f"sam-{variant}"].filename
        for variant in reversed(SAM_VIT_SIZES)
    ]
    return next((path for path in candidates if path.is_file()), candidates[0])


def build(
    name: str = "sam",
    model_type: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    architecture: SamArchitecture | Mapping[str, Any] | None = None,
    random_weights: bool = False,
    seed: int | None = None,
    autocast: bool | None = None,
) -> ExportingSamSegmenter:
    """Registry factory for ``sam``, ``sam-vit_b``, ``sam-vit_l``, ``sam-vit_h``.

    ``checkpoint``: a state-dict file; default ``$SAM_CHECKPOINT``, else the official file name in
    ``$TAPMASK_MODELS_DIR``. ``model_type=None`` reads the variant from the checkpoint.
    ``architecture``: ``SamArchitecture`` sizes (or a mapping of them) for a non-official model
    (tests); it replaces the official sizes. ``random_weights=True`` builds an untrained model and
    reads no file at all (benchmarks); it must be asked for, it is never a fallback. ``seed``:
    the torch seed those random weights are drawn with (None: torch's current state).
    ``autocast``: bf16 autocast for the image encoder on CUDA (default: on where supported).
    """
    if model_type is not None and model_type not in SAM_VIT_SIZES:
        raise ModelLoadError(
            f"unknown SAM model type {model_type!r}; expected one of {', '.join(SAM_VIT_SIZES)}"
        )
    path: Path | None = None
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        if architecture is None and model_type is None:
            raise ModelLoadError("random_weights=True needs a model_type or an architecture")
        if seed is not None:
            torch.manual_seed(seed)
        model = _construct(architecture or SAM_VIT_SIZES[str(model_type)])
    else:
        path = (
            Path(checkpoint).expanduser()
            if checkpoint is not None
            else default_checkpoint(model_type)
        )
        model = _load(path, name, model_type, architecture)
    return ExportingSamSegmenter(
        SegmentAnythingBackbone(model), name, device, autocast=autocast, checkpoint=path
    )


def _load(
    path: Path,
    name: str,
    model_type: str | None,
    architecture: SamArchitecture | Mapping[str, Any] | None,
) -> Sam:
    """The model of checkpoint file ``path``, its size checked against ``model_type``."""
    if not path.is_file():
        raise ModelLoadError(
            f"SAM checkpoint {path} not found; `tapmask weights sam-{model_type or 'vit_h'}` "
            "downloads it (or pass checkpoint=..., or set SAM_CHECKPOINT / TAPMASK_MODELS_DIR)"
        )
    state_dict = load_state_dict_file(path)
    if architecture is None:
        found = sam_variant(state_dict)
        if model_type is not None and found != model_type:
            raise ModelLoadError(
                f"SAM checkpoint {path} holds a {found} model, but {name!r} needs {model_type}"
            )
        architecture = SAM_VIT_SIZES[found]
    model = _construct(architecture)
    load_weights(model, state_dict, source=str(path))
    return model
