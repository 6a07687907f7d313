"""One SAM-style segmenter for every SAM-like model, whichever implementation runs the network.

A *backbone* (``Backbone``) runs the network: segment-anything's ``Sam``
(``backends.models.sam.backbone``) or a transformers model (``backends.models.hf.backbones``:
SAM, HQ-SAM, SAM 2.1, EdgeTAM). ``SamSegmenter`` owns what they all share, the ``Segmenter``
protocol around ``SamPredictor``'s arithmetic:

* ``encode`` runs the backbone's preprocessing and image encoder once per image (bf16 autocast on
  CUDA where supported, float32 on the CPU) and keeps float32 tensors (segment-anything's decoder
  fails on bf16 features). The result (``SamEmbedding``) is all the decoder needs, so the Engine
  caches it and accounts its real bytes; ``encode_calls`` counts the encoder runs.
* ``decode``: the first click asks for three masks (``multimask_output=True``) and keeps the one
  with the best predicted IoU; a box alone asks for one; later clicks feed the previous best
  low-resolution logits back as the mask input, one mask out. ``score`` is the predicted IoU.
  A mask the caller already has (``prompt.previous_mask``: a pre-annotation to refine) goes in
  as the mask input of a first decode (``mask_logits``).
* the shared-embedding byte format (``SharesEmbeddings``) and, for models whose image embedding
  is SAM's ``[1, 256, 64, 64]`` (``ExportingSamSegmenter``), the export CVAT's stock SAM plugin
  decodes (``ExportsEmbedding``).
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from backends.errors import ModelLoadError
from backends.models.torch_utils import auto_device, rgb
from backends.prompts import Prompt, Segmentation

_SHARED_FORMAT = "tapmask-sam-embedding/2"

#: The logit a caller's binary mask becomes (+ inside, − outside) as SAM's mask input. SAM's own
#: low-res logits run to about ±10–20 on confident pixels (SAM 2 clamps them at ±32); ±10 says
#: "confident" without saturating the prompt encoder's mask downscaling convolutions.
PREVIOUS_MASK_LOGIT = 10.0


@dataclass(frozen=True, eq=False)
class SamEmbedding:
    """One image's encoder output: every tensor the mask decoder needs, float32 on the model's
    device, plus the sizes that map prompts and masks back to the image.

    ``tensors``: SAM: the ``[1, 256, 64, 64]`` image embedding; HQ-SAM: that plus the first
    global-attention block's ViT features (``[1, 64, 64, width]``); SAM 2.1 / EdgeTAM: the two
    high-resolution feature maps (``[1, 32, 256, 256]``, ``[1, 64, 128, 128]``) and the image
    embedding (``[1, 256, 64, 64]``), in ``get_image_embeddings`` order.
    ``original_size``: the image's (H, W); ``input_size``: its (H, W) in the model's input frame
    before padding (SAM: longest side 1024; SAM 2: 1024×1024, the image is stretched).
    """

    tensors: tuple[torch.Tensor, ...]
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(sum(t.element_size() * t.nelement() for t in self.tensors))

    def to_numpy(self) -> list[np.ndarray]:
        """Float32 copies of ``tensors`` on the CPU."""
        return [t.detach().to("cpu", torch.float32).numpy().copy() for t in self.tensors]


class Backbone(Protocol):
    """What runs the network behind a ``SamSegmenter``. The segmenter calls the per-image and
    per-click methods under ``torch.inference_mode()``; tensors go to and come from ``device``."""

    #: Names the embedding layout in shared bytes ("segment-anything", "sam", "sam2"…).
    family: str
    model: torch.nn.Module
    #: Set by ``SamSegmenter`` once ``model`` is there.
    device: torch.device
    #: Clamp of the low-res logits kept for the next click (SAM 2: ±32), None: kept as they are.
    logit_clamp: float | None
    #: Size of the low-res logits the decoder makes and takes back as its mask input.
    mask_input_size: tuple[int, int]
    #: How the image sits in those logits: False (SAM, HQ-SAM) the input frame (the image resized
    #: to ``input_size``, padded at the bottom and right to a square of 4 × ``mask_input_size``)
    #: at a quarter of its resolution; True (SAM 2, EdgeTAM) the image stretched over all of it.
    stretches_image: bool

    def expected_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``SamEmbedding.tensors`` this model makes (validates shared embeddings)."""
        ...

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixel values for the image encoder and the image's (H, W) in the input frame."""
        ...

    def image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The image encoder: ``SamEmbedding.tensors`` (any float dtype)."""
        ...

    def prompt_inputs(self, prompt: Prompt, embedding: SamEmbedding) -> Any:
        """Clicks and box in the model's input frame, in whatever form ``predict_masks`` takes."""
        ...

    def predict_masks(
        self, embedding: SamEmbedding, inputs: Any, masks: torch.Tensor | None, multi: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for ``prompt_inputs``' ``inputs`` and the mask input
        ``masks``: low-res logits ``[1, C, h, w]`` and predicted IoUs ``[C]`` (C = 3 when
        ``multi``, the multimask output, else 1)."""
        ...

    def upscale(self, logits: torch.Tensor, embedding: SamEmbedding) -> np.ndarray:
        """The chosen low-res logits ``[1, 1, h, w]`` → a boolean mask at the image's size."""
        ...


class SamSegmenter:
    """A SAM-style model behind the ``Segmenter`` protocol; holds no per-image state."""

    replays_history = True

    def __init__(
        self,
        backbone: Backbone,
        name: str,
        device: str | torch.device | None = None,
        *,
        autocast: bool | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        """``checkpoint``: the file or directory the weights came from (None: random weights).
        ``autocast``: bf16 for the image encoder on CUDA (default: on where supported)."""
        self.name = name
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.device = auto_device(device)
        try:
            backbone.model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:  # e.g. device="cuda" on a CPU-only build
            raise ModelLoadError(f"cannot put {name} on device {device!r}: {exc}") from exc
        backbone.device = self.device
        if autocast is None:
            autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = bool(autocast) and self.device.type == "cuda"
        self._lock = threading.Lock()
        self.encode_calls = 0  # images through the image encoder, for tests and metrics
        self.encode_passes = 0  # encoder passes (a batched pass encodes several images)

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    @property
    def family(self) -> str:
        return self.backbone.family

    def __repr__(self) -> str:
        where = f", checkpoint={str(self.checkpoint)!r}" if self.checkpoint else ""
        return (
            f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, "
            f"device={self.device}{where})"
        )

    # -- per image ---------------------------------------------------------------------------

    def encode(self, image: np.ndarray) -> SamEmbedding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[SamEmbedding]:
        """Several images through the image encoder in one pass (``EncodesBatches``).

        Every backbone's input frame has one size (SAM pads to 1024×1024, SAM 2 resizes to
        it), so the pixel values stack; each image's embedding is its slice of the output,
        equal to a one-by-one encode within float tolerance.
        """
        images = [rgb(image) for image in images]
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            prepared = [self.backbone.preprocess(image) for image in images]
            # .to() keeps the memory format (EdgeTAM's backbone runs channels-last).
            pixels = [values.to(self.device, torch.float32) for values, _ in prepared]
            batch = pixels[0] if len(pixels) == 1 else _stack(pixels)
            with autocast:
                outputs = self.backbone.image_embeddings(batch)
            outputs = tuple(t.float() for t in outputs)
        with self._lock:
            self.encode_calls += len(images)
            self.encode_passes += 1
        return [
            SamEmbedding(
                tuple(t[index : index + 1].contiguous() for t in outputs),
                (int(image.shape[0]), int(image.shape[1])),
                input_size,
            )
            for index, (image, (_, input_size)) in enumerate(zip(images, prepared, strict=True))
        ]

    # -- memory (the Engine's host spill tier, out-of-memory recovery) ---------------------

    def embedding_to_host(self, embedding: SamEmbedding) -> SamEmbedding:
        if self.device.type == "cpu":
            return embedding
        tensors = tuple(t.to("cpu", non_blocking=False) for t in embedding.tensors)
        return SamEmbedding(tensors, embedding.original_size, embedding.input_size)

    def embedding_to_device(self, embedding: SamEmbedding) -> SamEmbedding:
        tensors = tuple(t.to(self.device) for t in embedding.tensors)
        return SamEmbedding(tensors, embedding.original_size, embedding.input_size)

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- sharing between processes (the Engine's shared embedding tier) -----------------------

    def embedding_to_bytes(self, embedding: SamEmbedding) -> bytes:
        """A small JSON header (format, family, shapes, sizes) + every tensor in fp16."""
        arrays = [
            t.detach().to("cpu", torch.float16).contiguous().numpy() for t in embedding.tensors
        ]
        header = json.dumps(
            {
                "format": _SHARED_FORMAT,
                "family": self.family,
                "shapes": [list(a.shape) for a in arrays],
                "original_size": list(embedding.original_size),
                "input_size": list(embedding.input_size),
            }
        ).encode()
        return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays)

    def embedding_from_bytes(self, data: bytes) -> SamEmbedding:
        """Inverse of ``embedding_to_bytes``; float32 tensors on this model's device."""
        (length,) = struct.unpack_from("<I", data)
        header = json.loads(bytes(data[4 : 4 + length]))
        if header.get("format") != _SHARED_FORMAT or header.get("family") != self.family:
            raise ValueError(
                f"not a shared {self.family} embedding: "
                f"{header.get('format')!r}/{header.get('family')!r}"
            )
        shapes = [tuple(int(v) for v in shape) for shape in header["shapes"]]
        expected = self.backbone.expected_shapes()
        if shapes != expected:
            raise ValueError(f"shared embedding has shapes {shapes}, this model makes {expected}")
        values = np.frombuffer(data, dtype=np.float16, offset=4 + length)
        sizes = [int(np.prod(shape)) for shape in shapes]
        if values.size != sum(sizes):
            raise ValueError("truncated shared embedding")
        offsets = np.cumsum([0, *sizes])
        tensors = tuple(
            torch.from_numpy(values[start:end].reshape(shape).astype(np.float32)).to(self.device)
            for start, end, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
        )
        original = tuple(int(v) for v in header["original_size"])
        input_size = tuple(int(v) for v in header["input_size"])
        return SamEmbedding(tensors, original, input_size)  # type: ignore[arg-type]

    # -- per click ---------------------------------------------------------------------------

    def _mask_input(self, state: Any) -> torch.Tensor:
        size = self.backbone.mask_input_size
        tensor = torch.as_tensor(np.asarray(state), dtype=torch.float32, device=self.device)
        if tensor.numel() != size[0] * size[1]:
            raise ValueError(
                f"{self.name} state must be {size} low-res logits, got {tuple(tensor.shape)}"
            )
        return tensor.reshape(1, 1, *size)

    def mask_logits(self, mask: np.ndarray, embedding: SamEmbedding) -> torch.Tensor:
        """A full-image binary mask as the decoder's ``[1, 1, h, w]`` mask input: the inverse of
        ``Backbone.upscale``'s geometry (SAM: resize to ``input_size``, pad bottom/right to the
        square input frame, area-downscale by 4; SAM 2: area-resize the whole image to the
        low-res size), the covered fraction f of each low-res pixel mapped linearly to
        ``(2f - 1) × PREVIOUS_MASK_LOGIT``: ±``PREVIOUS_MASK_LOGIT`` in and out of the mask,
        0 on its boundary. SAM's padding counts as outside (SAM's own logits there are negative).
        """
        low_h, low_w = self.backbone.mask_input_size
        fraction = np.asarray(mask, dtype=np.float32)
        if self.backbone.stretches_image:
            low = cv2.resize(fraction, (low_w, low_h), interpolation=cv2.INTER_AREA)
        else:
            in_h, in_w = embedding.input_size
            frame_h, frame_w = 4 * low_h, 4 * low_w
            resized = cv2.resize(fraction, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
            padded = np.zeros((max(frame_h, in_h), max(frame_w, in_w)), np.float32)
            padded[:in_h, :in_w] = resized
            low = cv2.resize(
                padded[:frame_h, :frame_w], (low_w, low_h), interpolation=cv2.INTER_AREA
            )
        logits = (2.0 * low - 1.0) * PREVIOUS_MASK_LOGIT
        return torch.as_tensor(logits, dtype=torch.float32, device=self.device)[None, None]

    def decode(
        self, image: np.ndarray, embedding: SamEmbedding, prompt: Prompt, state: Any | None
    ) -> tuple[Segmentation, np.ndarray]:
        """``SamPredictor.predict`` for one prompt, continuing from ``state``.

        * First decode (``state is None``) with clicks: three candidate masks
          (``multimask_output=True``), the one with the best predicted IoU is kept.
        * A box alone: one mask (``multimask_output=False``, SAM's advice for boxes).
        * Later clicks: the previous best low-res logits go in as the mask input, one mask out.

        * No state but ``prompt.previous_mask`` (a mask the caller already has, e.g. a
          pre-annotation being refined): that mask as the mask input (``mask_logits``), one mask
          out. The Engine's own history never travels this way: it keeps the decoder's low-res
          logits as ``state`` and rebuilds a missing one by replaying the clicks
          (``replays_history``), which is closer to what SAM was trained on than a binary mask.

        Returns the mask at the image's size, its predicted IoU as score, and the chosen
        low-res logits (float32 ``[1, 1, 256, 256]`` numpy array) as the next state.
        """
        if not isinstance(embedding, SamEmbedding):
            raise TypeError(f"expected a SamEmbedding from {self.name}.encode, got {embedding!r}")
        if tuple(np.shape(image)[:2]) != embedding.original_size:
            raise ValueError(
                f"image is {np.shape(image)[:2]}, the embedding was made for "
                f"{embedding.original_size}"
            )
        with torch.inference_mode():
            inputs = self.backbone.prompt_inputs(prompt, embedding)
            if state is None and prompt.previous_mask is not None:
                mask_input = self.mask_logits(prompt.previous_mask, embedding)
                multimask = False
            elif state is None:
                mask_input = None
                multimask = bool(prompt.clicks)  # a box alone is unambiguous enough
            else:
                mask_input = self._mask_input(state)
                multimask = False
            low_res, iou = self.backbone.predict_masks(embedding, inputs, mask_input, multimask)
            best = int(torch.argmax(iou)) if multimask else 0
            # Upscaling is per channel, so doing only the chosen mask gives SamPredictor's pixels.
            logits = low_res[:, best : best + 1].float()
            mask = self.backbone.upscale(logits, embedding)
            score = float(iou[best])
            clamp = self.backbone.logit_clamp
            kept = logits if clamp is None else logits.clamp(-clamp, clamp)
            new_state = kept.cpu().numpy().copy()
        return Segmentation(mask=mask, score=score, model=self.name), new_state


def _stack(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[1, C, H, W]`` pixel values along the batch, keeping channels-last."""
    batch = torch.cat(pixels, dim=0)
    if pixels[0].is_contiguous(memory_format=torch.channels_last) and not pixels[0].is_contiguous():
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


class ExportingSamSegmenter(SamSegmenter):
    """A SAM-style model whose first embedding tensor is SAM's ``[1, 256, 64, 64]`` image
    embedding (segment-anything SAM, transformers SAM and HQ-SAM): it can be exported."""

    def export_embedding(self, embedding: SamEmbedding) -> np.ndarray:
        """``SamPredictor.get_image_embedding()`` as float32 numpy (CVAT's stock SAM plugin)."""
        return embedding.tensors[0].detach().to("cpu", torch.float32).numpy().copy()
