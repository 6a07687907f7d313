"""SAM 2.1 (``Sam2Model``) and EdgeTAM (``EdgeTamModel``) from transformers, as
``SAM2ImagePredictor`` does for single images.

The image goes through ``Sam2ImageProcessor`` (resized to 1024×1024, aspect ratio *not* kept,
normalised) and ``get_image_embeddings`` once: the cached embedding is the list that call returns,
the two high-resolution feature maps (already projected by the mask decoder's ``conv_s0`` /
``conv_s1``) and the 64×64 image embedding. Clicks and boxes go through ``Sam2Processor`` with the
image's ``original_sizes`` (no image needed per click); masks come back through
``Sam2Processor.post_process_masks``. As in ``SAM2ImagePredictor``, the low-res logits kept for the
next click are clamped to ±32.

The mask decoder keeps SAM 2's ``dynamic_multimask_via_stability``: with one mask asked for (later
clicks, boxes), an unstable single-mask answer falls back to the best of the three candidates.
EdgeTAM's image encoder is a ``timm`` RepViT-M1: it needs the ``timm`` package. For inference
its BatchNorms and RepVGG branches are fused and it runs channels-last (``optimize_edgetam``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.errors import ModelLoadError
from backends.models.hf import HfModel, model_directory
from backends.models.hf.common import (
    HfEmbedding,
    HfSegmenter,
    click_arrays,
    load_checked,
    load_image_processor,
)
from backends.prompts import Prompt

#: Logit clamp of ``SAM2ImagePredictor._predict`` for the mask fed back on the next click.
LOGIT_CLAMP = 32.0

#: Hiera backbones of the official SAM 2.1 configs (``sam2.1_hiera_{t,s,b+,l}.yaml``);
#: ``Sam2Config()``'s defaults are the tiny one.
HIERA_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"blocks_per_stage": [1, 2, 11, 2], "global_attention_blocks": [7, 10, 13]},
    "base-plus": {
        "hidden_size": 112,
        "num_attention_heads": 2,
        "blocks_per_stage": [2, 3, 16, 3],
        "embed_dim_per_stage": [112, 224, 448, 896],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "global_attention_blocks": [12, 16, 20],
        "window_positional_embedding_background_size": [14, 14],
    },
    "large": {
        "hidden_size": 144,
        "num_attention_heads": 2,
        "blocks_per_stage": [2, 6, 36, 4],
        "embed_dim_per_stage": [144, 288, 576, 1152],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "global_attention_blocks": [23, 33, 43],
        "window_size_per_stage": [8, 4, 16, 8],
    },
}


#: EdgeTAM's image encoder: timm's RepViT-M1, four feature levels (as in yonigozlan/EdgeTAM-hf).
#: Spelled out because ``EdgeTamConfig()``'s default misspells the key (``"archirecture"`` in
#: transformers 5.23), which silently builds timm's default architecture, a ResNet-50.
EDGETAM_BACKBONE: dict[str, Any] = {
    "architecture": "repvit_m1",
    "model_args": {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
}


def default_config(info: HfModel, **overrides: Any) -> Any:
    """The official architecture of ``info``: SAM 2.1 tiny is ``Sam2Config()``'s defaults, the
    other Hiera sizes come from ``HIERA_CONFIGS``, EdgeTAM is ``EdgeTamConfig`` with the
    RepViT-M1 backbone. ``overrides``: extra ``EdgeTamConfig`` / ``Sam2Config`` arguments."""
    from transformers import EdgeTamConfig, Sam2Config, TimmWrapperConfig

    if info.family.key == "edgetam":
        backbone = TimmWrapperConfig(**EDGETAM_BACKBONE)
        vision = {"backbone_config": backbone, **overrides.pop("vision_config", {})}
        return EdgeTamConfig(vision_config=vision, **overrides)
    backbone = dict(HIERA_CONFIGS[info.variant])
    if not backbone:
        return Sam2Config(**overrides)
    dims = backbone.get("embed_dim_per_stage", [96, 192, 384, 768])
    return Sam2Config(
        vision_config={
            "backbone_config": {"model_type": "sam2_hiera_det_model", **backbone},
            "backbone_channel_list": list(reversed(dims)),
        },
        **overrides,
    )


def _require_timm(info: HfModel) -> None:
    if info.family.key == "edgetam" and importlib.util.find_spec("timm") is None:
        raise ModelLoadError(
            f"model {info.name!r} needs the timm package for its RepViT image encoder "
            "(pip install timm)"
        )


def optimize_edgetam(model: Any) -> bool:
    """Inference-only speed-ups for EdgeTAM's RepViT backbone; returns whether they applied.

    * timm's ``reparameterize_model`` folds every BatchNorm into its convolution and merges the
      RepVGG branches (the same outputs to float rounding: RepViT is built to be fused);
    * the backbone runs channels-last, the layout oneDNN / cuDNN convolutions prefer.

    Together about 2x faster image encodes on a CPU. The model must be in eval mode (the fusion
    uses BatchNorm's running statistics) and is never trained or saved afterwards.
    """
    backbone = getattr(model.vision_encoder, "backbone", None)
    timm_model = getattr(backbone, "timm_model", None)
    if timm_model is None:
        return False
    try:
        from timm.models import reparameterize_model
    except ImportError:  # older timm
        from timm.utils.model import reparameterize_model
    reparameterize_model(timm_model, inplace=True)
    backbone.to(memory_format=torch.channels_last)
    return True


def build(
    info: HfModel,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    autocast: bool | None = None,
    check_variant: bool = True,
    random_weights: bool = False,
    fuse_backbone: bool = True,
) -> Sam2HfSegmenter:
    from transformers import EdgeTamModel, Sam2ImageProcessor, Sam2Model, Sam2Processor

    model_class = EdgeTamModel if info.family.key == "edgetam" else Sam2Model
    directory: Path | None = None
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        _require_timm(info)
        model = model_class(default_config(info)).eval()
    else:
        directory = model_directory(info.name, checkpoint)
        model = load_checked(
            model_class,
            info,
            directory,
            variant=check_variant,
            requires=lambda: _require_timm(info),
        )
    channels_last = info.family.key == "edgetam" and fuse_backbone and optimize_edgetam(model)
    image_processor = load_image_processor(Sam2ImageProcessor, directory)
    processor = Sam2Processor(
        image_processor=image_processor, target_size=int(image_processor.size["height"])
    )
    segmenter = Sam2HfSegmenter(
        model, processor, info.name, device, autocast=autocast, directory=directory
    )
    segmenter.family = info.family.key
    segmenter.channels_last = channels_last
    return segmenter


class Sam2HfSegmenter(HfSegmenter):
    """``Sam2Model`` / ``EdgeTamModel`` behind the ``Segmenter`` protocol."""

    family = "sam2"
    channels_last = False  # feed the image encoder NHWC pixels (EdgeTAM's fused conv backbone)

    def expected_shapes(self) -> list[tuple[int, ...]]:
        config = self.model.config
        hidden = int(config.mask_decoder_config.hidden_size)
        channels = [hidden // 8, hidden // 4, int(config.vision_config.fpn_hidden_size)]
        sizes = [tuple(int(v) for v in size) for size in self.model.backbone_feature_sizes]
        return [(1, c, *size) for c, size in zip(channels, sizes, strict=True)]

    # -- per image ---------------------------------------------------------------------------

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        inputs = self.processor.image_processor(
            images=image, return_tensors="pt", input_data_format="channels_last"
        )
        pixel_values = inputs["pixel_values"]
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values, size

    def _image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.get_image_embeddings(pixel_values))

    # -- per click ---------------------------------------------------------------------------

    def _prompt_inputs(self, prompt: Prompt, embedding: HfEmbedding) -> dict[str, torch.Tensor]:
        points, labels = click_arrays(prompt)
        encoded = self.processor(
            input_points=[[points]] if points else None,
            input_labels=[[labels]] if labels else None,
            input_boxes=[[list(prompt.box.as_xyxy())]] if prompt.box is not None else None,
            original_sizes=[list(embedding.original_size)],
            return_tensors="pt",
        )
        return {
            key: encoded[key].to(self.device)
            for key in ("input_points", "input_labels", "input_boxes")
            if key in encoded
        }

    def _forward(
        self,
        embedding: HfEmbedding,
        inputs: dict[str, torch.Tensor],
        input_masks: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(
            image_embeddings=list(embedding.tensors),
            input_masks=input_masks,
            multimask_output=multimask,
            **inputs,
        )
        return outputs.pred_masks, outputs.iou_scores

    def _upscale(self, logits: torch.Tensor, embedding: HfEmbedding) -> np.ndarray:
        masks = self.processor.post_process_masks([logits], [list(embedding.original_size)])
        return masks[0][0, 0].cpu().numpy()

    def _next_state(self, logits: torch.Tensor) -> np.ndarray:
        return logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).float().cpu().numpy().copy()
