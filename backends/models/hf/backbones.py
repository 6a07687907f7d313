"""transformers models as ``SamSegmenter`` backbones: SAM and HQ-SAM (``SamModel``,
``SamHQModel``) as ``SamPredictor`` does, SAM 2.1 and EdgeTAM (``Sam2Model``, ``EdgeTamModel``)
as ``SAM2ImagePredictor`` does for single images.

SAM / HQ-SAM: the image goes through ``SamImageProcessor`` (longest side to 1024, normalise, pad to
1024×1024) and ``get_image_embeddings`` once; clicks and boxes are scaled into that resized frame
exactly as ``SamProcessor`` does (its ``__call__`` insists on re-processing the image with every
prompt, which would cost more than the decoder, so the same arithmetic is applied to the reshaped
size the image processor reported at encode time). Masks come back through
``SamProcessor.post_process_masks`` (upscale to 1024, crop the padding, resize to the image).
HQ-SAM also keeps the first global-attention block's ViT features (``intermediate_embeddings[0]``,
the only one its mask decoder reads) in the cached embedding. Its decoder adds the HQ token's
mask to each SAM mask (``hq_token_only=False``, HQ-SAM's default) and sorts the multimask
candidates by predicted IoU.

SAM 2.1 / EdgeTAM: the image goes through ``Sam2ImageProcessor`` (resized to 1024×1024, aspect
ratio *not* kept, normalised) and ``get_image_embeddings`` once: the cached embedding is the list
that call returns, the two high-resolution feature maps (already projected by the mask decoder's
``conv_s0`` / ``conv_s1``) and the 64×64 image embedding. Clicks and boxes go through
``Sam2Processor`` with the image's ``original_sizes`` (no image needed per click); masks come back
through ``Sam2Processor.post_process_masks``. As in ``SAM2ImagePredictor``, the low-res logits
kept for the next click are clamped to ±32. The mask decoder keeps SAM 2's
``dynamic_multimask_via_stability``: with one mask asked for (later clicks, boxes), an unstable
single-mask answer falls back to the best of the three candidates. EdgeTAM's RepViT image encoder
may run channels-last once fused (``backends.models.hf.families.optimize_edgetam``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from backends.models.sam.core import SamEmbedding
from backends.prompts import Prompt

#: Logit clamp of ``SAM2ImagePredictor._predict`` for the mask fed back on the next click.
SAM2_LOGIT_CLAMP = 32.0


def _click_arrays(prompt: Prompt) -> tuple[list[list[float]], list[int]]:
    """Clicks as ``[[x, y], …]`` image pixels and ``[1 | 0, …]`` labels."""
    return (
        [[c.x, c.y] for c in prompt.clicks],
        [1 if c.positive else 0 for c in prompt.clicks],
    )


class _TransformersBackbone:
    """A transformers model and its processor (image processor + prompt and mask arithmetic)."""

    logit_clamp: float | None = None

    def __init__(self, model: Any, processor: Any, family: str) -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.device = torch.device("cpu")

    def _process_image(self, image: np.ndarray) -> dict[str, Any]:
        if not image.flags.writeable:  # the Engine's cached images are read-only; torch warns
            image = image.copy()
        return self.processor.image_processor(
            images=image, return_tensors="pt", input_data_format="channels_last"
        )


class SamHfBackbone(_TransformersBackbone):
    """``SamModel`` / ``SamHQModel`` (``hq``)."""

    stretches_image = False

    def __init__(self, model: Any, processor: Any, *, hq: bool, hq_token_only: bool) -> None:
        super().__init__(model, processor, "sam_hq" if hq else "sam")
        self.hq = hq
        self.hq_token_only = bool(hq_token_only)
        side = 4 * int(model.config.prompt_encoder_config.image_embedding_size)
        self.mask_input_size = (side, side)

    def expected_shapes(self) -> list[tuple[int, ...]]:
        config = self.model.config
        side = int(config.prompt_encoder_config.image_embedding_size)
        shapes: list[tuple[int, ...]] = [(1, int(config.vision_config.output_channels), side, side)]
        if self.hq and list(config.vision_config.global_attn_indexes):
            vit_side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
            shapes.append((1, vit_side, vit_side, int(config.vision_config.hidden_size)))
        return shapes

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        inputs = self._process_image(image)
        reshaped = inputs["reshaped_input_sizes"][0]
        return inputs["pixel_values"], (int(reshaped[0]), int(reshaped[1]))

    def image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.hq:
            return (self.model.get_image_embeddings(pixel_values),)
        embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
        return (embeddings, intermediate[0]) if len(intermediate) else (embeddings,)

    def prompt_inputs(self, prompt: Prompt, embedding: SamEmbedding) -> dict[str, torch.Tensor]:
        """``SamProcessor._normalize_coordinates``: scale by resized / original size."""
        (old_h, old_w), (new_h, new_w) = embedding.original_size, embedding.input_size
        scale = np.array([new_w / old_w, new_h / old_h], dtype=np.float64)
        inputs: dict[str, torch.Tensor] = {}
        if prompt.clicks:
            points, labels = _click_arrays(prompt)
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

    def predict_masks(
        self, embedding: SamEmbedding, inputs: dict[str, Tensor], masks: Tensor | None, multi: bool
    ) -> tuple[Tensor, Tensor]:
        kwargs: dict[str, Any] = dict(inputs)
        if self.hq:
            kwargs["intermediate_embeddings"] = list(embedding.tensors[1:2]) or None
            kwargs["hq_token_only"] = self.hq_token_only
        outputs = self.model(
            image_embeddings=embedding.tensors[0],
            input_masks=masks,
            multimask_output=multi,
            **kwargs,
        )
        return outputs.pred_masks[0], outputs.iou_scores.reshape(-1)

    def upscale(self, logits: torch.Tensor, embedding: SamEmbedding) -> np.ndarray:
        masks = self.processor.post_process_masks(
            [logits], [list(embedding.original_size)], [list(embedding.input_size)]
        )
        return masks[0][0, 0].cpu().numpy()


class Sam2HfBackbone(_TransformersBackbone):
    """``Sam2Model`` / ``EdgeTamModel`` (``family`` "sam2" / "edgetam")."""

    logit_clamp = SAM2_LOGIT_CLAMP
    stretches_image = True

    def __init__(self, model: Any, processor: Any, *, family: str, channels_last: bool) -> None:
        super().__init__(model, processor, family)
        self.channels_last = channels_last  # NHWC pixels for EdgeTAM's fused conv backbone
        self.mask_input_size = tuple(int(v) for v in model.prompt_encoder.mask_input_size)

    def expected_shapes(self) -> list[tuple[int, ...]]:
        config = self.model.config
        hidden = int(config.mask_decoder_config.hidden_size)
        channels = [hidden // 8, hidden // 4, int(config.vision_config.fpn_hidden_size)]
        sizes = [tuple(int(v) for v in size) for size in self.model.backbone_feature_sizes]
        return [(1, c, *size) for c, size in zip(channels, sizes, strict=True)]

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        pixel_values = self._process_image(image)["pixel_values"]
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values, size

    def image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.get_image_embeddings(pixel_values))

    def prompt_inputs(self, prompt: Prompt, embedding: SamEmbedding) -> dict[str, torch.Tensor]:
        points, labels = _click_arrays(prompt)
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

    def predict_masks(
        self, embedding: SamEmbedding, inputs: dict[str, Tensor], masks: Tensor | None, multi: bool
    ) -> tuple[Tensor, Tensor]:
        outputs = self.model(
            image_embeddings=list(embedding.tensors),
            input_masks=masks,
            multimask_output=multi,
            **inputs,
        )
        return outputs.pred_masks[0], outputs.iou_scores.reshape(-1)

    def upscale(self, logits: torch.Tensor, embedding: SamEmbedding) -> np.ndarray:
        masks = self.processor.post_process_masks([logits], [list(embedding.original_size)])
        return masks[0][0, 0].cpu().numpy()
