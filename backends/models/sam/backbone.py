"""segment-anything's ``Sam`` as a ``SamSegmenter`` backbone, with ``SamPredictor``'s arithmetic.

``preprocess`` + ``image_embeddings`` are exactly what ``SamPredictor.set_image`` computes
(ResizeLongestSide to the encoder's input size, normalise + pad, image encoder);
``prompt_inputs`` + ``predict_masks`` + ``upscale`` are ``SamPredictor.predict`` for one prompt,
but taking the embedding as an argument instead of keeping it in a shared predictor, so the Engine
can cache embeddings of many images and decode against any of them.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from backends.models.sam.core import SamEmbedding
from backends.prompts import Prompt

#: (point coordinates and labels, or None; box, or None) in the encoder's input frame.
SamPrompts = tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]


class SegmentAnythingBackbone:
    family = "segment-anything"
    logit_clamp: float | None = None
    stretches_image = False

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.device = torch.device("cpu")
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        height, width = model.prompt_encoder.mask_input_size
        self.mask_input_size = (int(height), int(width))

    def expected_shapes(self) -> list[tuple[int, ...]]:
        encoder = self.model.prompt_encoder
        return [(1, encoder.embed_dim, *encoder.image_embedding_size)]

    # -- per image ---------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        tensor = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        tensor = tensor.permute(2, 0, 1).contiguous()[None, :, :, :]
        input_size = (int(tensor.shape[-2]), int(tensor.shape[-1]))
        return self.model.preprocess(tensor), input_size

    def image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model.image_encoder(pixel_values),)

    # -- per click ---------------------------------------------------------------------------

    def prompt_inputs(self, prompt: Prompt, embedding: SamEmbedding) -> SamPrompts:
        points = box = None
        if prompt.clicks:
            xy = np.array([[c.x, c.y] for c in prompt.clicks], dtype=np.float64)
            xy = self.transform.apply_coords(xy, embedding.original_size)
            coords = torch.as_tensor(xy, dtype=torch.float, device=self.device)[None, :, :]
            labels = torch.as_tensor(
                [1 if c.positive else 0 for c in prompt.clicks], dtype=torch.int, device=self.device
            )[None, :]
            points = (coords, labels)
        if prompt.box is not None:
            xyxy = self.transform.apply_boxes(
                np.array(prompt.box.as_xyxy(), dtype=np.float64), embedding.original_size
            )
            box = torch.as_tensor(xyxy, dtype=torch.float, device=self.device)[None, :]
        return points, box

    def predict_masks(
        self, embedding: SamEmbedding, inputs: SamPrompts, masks: Tensor | None, multi: bool
    ) -> tuple[Tensor, Tensor]:
        points, box = inputs
        sparse, dense = self.model.prompt_encoder(points=points, boxes=box, masks=masks)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding.tensors[0],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multi,
        )
        return low_res, iou[0]

    def upscale(self, logits: torch.Tensor, embedding: SamEmbedding) -> np.ndarray:
        upscaled = self.model.postprocess_masks(
            logits, embedding.input_size, embedding.original_size
        )
        return (upscaled[0, 0] > self.model.mask_threshold).cpu().numpy()
