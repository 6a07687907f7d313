"""SAM (``SamModel``) and HQ-SAM (``SamHQModel``) from transformers, as ``SamPredictor`` does.

The image goes through ``SamImageProcessor`` (longest side to 1024, normalise, pad to 1024×1024)
and ``get_image_embeddings`` once; clicks and boxes are scaled into that resized frame exactly as
``SamProcessor`` does (its ``__call__`` insists on re-processing the image with every prompt,
which would cost more than the decoder, so the same arithmetic is applied to the reshaped size
the image processor reported at encode time). Masks come back through
``SamProcessor.post_process_masks`` (upscale to 1024, crop the padding, resize to the image).

HQ-SAM also keeps the first global-attention block's ViT features (``intermediate_embeddings[0]``,
the only one its mask decoder reads) in the cached embedding. Its decoder adds the HQ token's
mask to each SAM mask (``hq_token_only=False``, HQ-SAM's default) and sorts the multimask
candidates by predicted IoU.
"""

from __future__ import annotations

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

#: The official ViT encoders (as in ``segment_anything.build_sam``).
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit_l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}


def default_config(info: HfModel) -> Any:
    """The official architecture of ``info`` (transformers' other defaults are SAM's)."""
    from transformers import SamConfig, SamHQConfig

    vision = dict(VIT_CONFIGS[info.variant])
    if info.family.key == "sam_hq":
        return SamHQConfig(
            vision_config=vision, mask_decoder_config={"vit_dim": vision["hidden_size"]}
        )
    return SamConfig(vision_config=vision)


def build(
    info: HfModel,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    autocast: bool | None = None,
    check_variant: bool = True,
    random_weights: bool = False,
    hq_token_only: bool = False,
) -> SamHfSegmenter:
    from transformers import SamHQModel, SamHQProcessor, SamImageProcessor, SamModel, SamProcessor

    hq = info.family.key == "sam_hq"
    model_class = SamHQModel if hq else SamModel
    directory: Path | None = None
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        model = model_class(default_config(info)).eval()
    else:
        directory = model_directory(info.name, checkpoint)
        model = load_checked(model_class, info, directory, variant=check_variant)
    image_processor = load_image_processor(SamImageProcessor, directory)
    processor = (SamHQProcessor if hq else SamProcessor)(image_processor=image_processor)
    return SamHfSegmenter(
        model,
        processor,
        info.name,
        device,
        autocast=autocast,
        directory=directory,
        hq=hq,
        hq_token_only=hq_token_only,
    )


class SamHfSegmenter(HfSegmenter):
    """``SamModel`` / ``SamHQModel`` behind the ``Segmenter`` protocol."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        device: str | torch.device | None = None,
        *,
        autocast: bool | None = None,
        directory: Path | None = None,
        hq: bool = False,
        hq_token_only: bool = False,
    ) -> None:
        super().__init__(model, processor, name, device, autocast=autocast, directory=directory)
        self.hq = hq
        self.hq_token_only = bool(hq_token_only)
        self.family = "sam_hq" if hq else "sam"

    def expected_shapes(self) -> list[tuple[int, ...]]:
        config = self.model.config
        side = int(config.prompt_encoder_config.image_embedding_size)
        shapes: list[tuple[int, ...]] = [(1, int(config.vision_config.output_channels), side, side)]
        if self.hq and list(config.vision_config.global_attn_indexes):
            vit_side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
            shapes.append((1, vit_side, vit_side, int(config.vision_config.hidden_size)))
        return shapes

    def mask_input_size(self) -> tuple[int, int]:
        side = 4 * int(self.model.config.prompt_encoder_config.image_embedding_size)
        return (side, side)

    # -- per image ---------------------------------------------------------------------------

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        inputs = self.processor.image_processor(
            images=image, return_tensors="pt", input_data_format="channels_last"
        )
        reshaped = inputs["reshaped_input_sizes"][0]
        return inputs["pixel_values"], (int(reshaped[0]), int(reshaped[1]))

    def _image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.hq:
            return (self.model.get_image_embeddings(pixel_values),)
        embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
        return (embeddings, intermediate[0]) if len(intermediate) else (embeddings,)

    def export_embedding(self, embedding: HfEmbedding) -> np.ndarray:
        """The ``[1, 256, 64, 64]`` image embedding as float32 numpy (CVAT's stock SAM plugin)."""
        return embedding.to_numpy()[0]

    # -- per click ---------------------------------------------------------------------------

    def _prompt_inputs(self, prompt: Prompt, embedding: HfEmbedding) -> dict[str, torch.Tensor]:
        """``SamProcessor._normalize_coordinates``: scale by resized / original size."""
        (old_h, old_w), (new_h, new_w) = embedding.original_size, embedding.input_size
        scale = np.array([new_w / old_w, new_h / old_h], dtype=np.float64)
        inputs: dict[str, torch.Tensor] = {}
        if prompt.clicks:
            points, labels = click_arrays(prompt)
            xy = np.asarray(points, dtype=np.float64) * scale
            inputs["input_points"] = torch.as_tensor(
                xy[None, None], dtype=torch.float32, device=self.device
            )
            inputs["input_labels"] = torch.as_tensor(
                [[labels]], dtype=torch.int64, device=self.device
            )
        if prompt.box is not None:
            corners = np.asarray(prompt.box.as_xyxy(), dtype=np.float64).reshape(2, 2) * scale
            inputs["input_boxes"] = torch.as_tensor(
                corners.reshape(1, 1, 4), dtype=torch.float32, device=self.device
            )
        return inputs

    def _forward(
        self,
        embedding: HfEmbedding,
        inputs: dict[str, torch.Tensor],
        input_masks: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs: dict[str, Any] = dict(inputs)
        if self.hq:
            kwargs["intermediate_embeddings"] = list(embedding.tensors[1:2]) or None
            kwargs["hq_token_only"] = self.hq_token_only
        outputs = self.model(
            image_embeddings=embedding.tensors[0],
            input_masks=input_masks,
            multimask_output=multimask,
            **kwargs,
        )
        return outputs.pred_masks, outputs.iou_scores

    def _upscale(self, logits: torch.Tensor, embedding: HfEmbedding) -> np.ndarray:
        masks = self.processor.post_process_masks(
            [logits], [list(embedding.original_size)], [list(embedding.input_size)]
        )
        return masks[0][0, 0].cpu().numpy()
