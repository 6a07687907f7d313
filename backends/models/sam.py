"""Segment Anything (``segment-anything`` package) behind the ``Segmenter`` protocol.

``encode`` is exactly what ``SamPredictor.set_image`` computes (ResizeLongestSide to the encoder's
input size, normalise + pad, image encoder); ``decode`` is ``SamPredictor.predict`` for one
prompt, but taking the embedding as an argument instead of keeping it in a shared predictor, so
the Engine can cache embeddings of many images and decode against any of them.

Checkpoints are plain state dicts (as Meta publishes them). They are loaded on the CPU with
``weights_only=True`` (segment-anything's own builder calls ``torch.load`` without a
``map_location``, which fails for a GPU-saved file on a CPU box, and unpickles arbitrary objects),
then strictly, so a wrong or truncated file is an error naming the offending keys rather than a
model that silently produces garbage.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

from backends.errors import ModelLoadError
from backends.models.torch_utils import (
    SAM_VIT_ARCHITECTURES,
    auto_device,
    check_embedding_matches,
    rgb,
)
from backends.prompts import Prompt, Segmentation
from backends.weights import OFFICIAL_WEIGHTS, models_dir

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")

#: Encoder sizes of the official checkpoints (as in ``segment_anything.build_sam``).
OFFICIAL_ARCHITECTURES = SAM_VIT_ARCHITECTURES

_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"
_TYPE_BY_WIDTH = {
    arch["encoder_embed_dim"]: model_type for model_type, arch in OFFICIAL_ARCHITECTURES.items()
}


# --------------------------------------------------------------------------------------------
# Building


def build_sam_from_config(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    *,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    num_multimask_outputs: int = 3,
) -> Sam:
    """``segment_anything.build_sam._build_sam`` with every size configurable (random weights).

    The defaults are SAM's; the four encoder arguments of ``OFFICIAL_ARCHITECTURES`` give the
    official models, tiny values give fast test models.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    embedding_size = image_size // patch_size
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def _construct(model_type: str | None, architecture: Mapping[str, Any] | None) -> Sam:
    if architecture is not None:
        try:
            return build_sam_from_config(**dict(architecture))
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelLoadError(f"bad SAM architecture {dict(architecture)!r}: {exc}") from exc
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"unknown SAM model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    return sam_model_registry[model_type](checkpoint=None)


def infer_model_type(state_dict: Mapping[str, Any]) -> str:
    """vit_b / vit_l / vit_h from the patch embedding's width (768 / 1024 / 1280)."""
    weight = state_dict.get(_PATCH_EMBED_KEY)
    if weight is None or not hasattr(weight, "shape") or len(weight.shape) != 4:
        raise ModelLoadError(
            f"cannot tell the SAM variant: the checkpoint has no {_PATCH_EMBED_KEY!r} tensor "
            "(is it a segment-anything checkpoint?)"
        )
    width = int(weight.shape[0])
    try:
        return _TYPE_BY_WIDTH[width]
    except KeyError:
        raise ModelLoadError(
            f"cannot tell the SAM variant: image-encoder width {width} is none of "
            f"{sorted(_TYPE_BY_WIDTH)} (vit_b/vit_l/vit_h); pass architecture=... for other sizes"
        ) from None


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a plain state dict onto the CPU, refusing pickled code (``weights_only=True``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"SAM checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for bad files (UnpicklingError, IndexError…)
        raise ModelLoadError(
            f"cannot load SAM checkpoint {path}: {exc}".strip()
            + " (only plain tensor state dicts are accepted; weights_only=True)"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ModelLoadError(
            f"SAM checkpoint {path} is not a state dict of tensors (got {type(state).__name__})"
        )
    return dict(state)


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items)} in all)" if len(items) > n else "")


def load_weights(model: Sam, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """``load_state_dict(strict=True)`` with a clear error for missing/extra/mis-shaped keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (checkpoint vs model): {_first(mismatched)}")
    where = f" {source}" if source else ""
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
    candidates = [directory / OFFICIAL_WEIGHTS[f"sam-{t}"].filename for t in reversed(MODEL_TYPES)]
    return next((path for path in candidates if path.is_file()), candidates[0])


def build(
    name: str = "sam",
    model_type: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    architecture: Mapping[str, Any] | None = None,
    random_weights: bool = False,
    autocast: bool | None = None,
) -> SamSegmenter:
    """Registry factory for ``sam``, ``sam-vit_b``, ``sam-vit_l``, ``sam-vit_h``.

    ``checkpoint``: a state-dict file; default ``$SAM_CHECKPOINT``, else the official file name in
    ``$TAPMASK_MODELS_DIR``. ``model_type=None`` reads the variant from the checkpoint.
    ``architecture``: ``build_sam_from_config`` keyword arguments for a non-official size (tests);
    it replaces the official encoder sizes. ``random_weights=True`` builds an untrained model and
    reads no file at all (benchmarks); it must be asked for, it is never a fallback.
    ``autocast``: bf16 autocast for the image encoder on CUDA (default: on where supported).
    """
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"unknown SAM model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )

    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        if architecture is None and model_type is None:
            raise ModelLoadError("random_weights=True needs a model_type or an architecture")
        model = _construct(model_type, architecture)
        return _segmenter(model, name, device, model_type, autocast, None)

    path = (
        Path(checkpoint).expanduser() if checkpoint is not None else default_checkpoint(model_type)
    )
    if not path.is_file():
        variant = model_type or "vit_h"
        raise ModelLoadError(
            f"SAM checkpoint {path} not found; `tapmask weights sam-{variant}` downloads it "
            f"(or pass checkpoint=..., or set SAM_CHECKPOINT / TAPMASK_MODELS_DIR)"
        )
    state_dict = load_state_dict_file(path)
    if architecture is None:
        found = infer_model_type(state_dict)
        if model_type is not None and found != model_type:
            raise ModelLoadError(
                f"SAM checkpoint {path} holds a {found} model, but {name!r} needs {model_type}"
            )
        model_type = found
    model = _construct(model_type, architecture)
    load_weights(model, state_dict, source=str(path))
    del state_dict
    return _segmenter(model, name, device, model_type, autocast, path)


def _segmenter(
    model: Sam,
    name: str,
    device: str | torch.device | None,
    model_type: str | None,
    autocast: bool | None,
    checkpoint: Path | None,
) -> SamSegmenter:
    try:
        return SamSegmenter(
            model,
            name=name,
            device=device,
            model_type=model_type,
            autocast=autocast,
            checkpoint=checkpoint,
        )
    except (RuntimeError, AssertionError) as exc:  # e.g. device="cuda" on a CPU-only build
        raise ModelLoadError(f"cannot put SAM on device {device!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Embedding and segmenter


@dataclass(frozen=True, eq=False)
class SamEmbedding:
    """One image's encoder output, plus the sizes needed to map prompts and masks back.

    ``features``: float32 ``[1, C, h, w]`` on the model's device (C=256, h=w=64 for the official
    models); ``original_size``: the image's (H, W); ``input_size``: its (H, W) after
    ResizeLongestSide, before padding.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.features.element_size() * self.features.nelement())

    def to_numpy(self) -> np.ndarray:
        """A float32 copy of ``features`` on the CPU (``SamPredictor.get_image_embedding()``)."""
        return self.features.detach().to("cpu", torch.float32).numpy().copy()


_SHARED_FORMAT = "tapmask-sam-embedding/1"


def embedding_to_numpy(embedding: SamEmbedding) -> np.ndarray:
    return embedding.to_numpy()


class SamSegmenter:
    """SAM behind the ``Segmenter`` protocol; holds no per-image state between calls."""

    replays_history = True

    def __init__(
        self,
        model: Sam,
        name: str = "sam",
        device: str | torch.device | None = None,
        *,
        model_type: str | None = None,
        autocast: bool | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        self.name = name
        self.model_type = model_type
        self.checkpoint = checkpoint
        self.device = auto_device(device)
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        if autocast is None:
            autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = bool(autocast) and self.device.type == "cuda"
        self._lock = threading.Lock()
        self.encode_calls = 0  # image-encoder runs, for tests and metrics

    def __repr__(self) -> str:
        return (
            f"SamSegmenter(name={self.name!r}, model_type={self.model_type!r}, "
            f"device={self.device})"
        )

    # -- per image ---------------------------------------------------------------------------

    def encode(self, image: np.ndarray) -> SamEmbedding:
        """``SamPredictor.set_image`` (RGB input): resize, normalise + pad, image encoder."""
        image = rgb(image)
        input_image = self.transform.apply_image(image)
        with torch.inference_mode():
            tensor = torch.as_tensor(input_image, device=self.device)
            tensor = tensor.permute(2, 0, 1).contiguous()[None, :, :, :]
            input_size = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            tensor = self.model.preprocess(tensor)
            if self.autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    features = self.model.image_encoder(tensor)
            else:
                features = self.model.image_encoder(tensor)
            # segment-anything's decoder fails on bf16 features: always hand it float32.
            features = features.float()
        with self._lock:
            self.encode_calls += 1
        return SamEmbedding(features, (int(image.shape[0]), int(image.shape[1])), input_size)

    # -- sharing between processes (the Engine's shared embedding tier) -----------------------

    def embedding_to_bytes(self, embedding: SamEmbedding) -> bytes:
        """Compact form for the shared cache: a small JSON header + the features in fp16."""
        features = embedding.features.detach().to("cpu", torch.float16).contiguous().numpy()
        header = json.dumps(
            {
                "format": _SHARED_FORMAT,
                "shape": list(features.shape),
                "original_size": list(embedding.original_size),
                "input_size": list(embedding.input_size),
            }
        ).encode()
        return struct.pack("<I", len(header)) + header + features.tobytes()

    def embedding_from_bytes(self, data: bytes) -> SamEmbedding:
        """Inverse of ``embedding_to_bytes``; float32 features on this model's device."""
        (length,) = struct.unpack_from("<I", data)
        header = json.loads(bytes(data[4 : 4 + length]))
        if header.get("format") != _SHARED_FORMAT:
            raise ValueError(f"not a shared SAM embedding: {header.get('format')!r}")
        shape = tuple(int(v) for v in header["shape"])
        expected = (
            1,
            self.model.prompt_encoder.embed_dim,
            *self.model.prompt_encoder.image_embedding_size,
        )
        if shape != expected:
            raise ValueError(f"shared embedding has shape {shape}, this model makes {expected}")
        values = np.frombuffer(data, dtype=np.float16, offset=4 + length)
        if values.size != int(np.prod(shape)):
            raise ValueError("truncated shared embedding")
        features = torch.from_numpy(values.reshape(shape).astype(np.float32)).to(self.device)
        original = tuple(int(v) for v in header["original_size"])
        input_size = tuple(int(v) for v in header["input_size"])
        return SamEmbedding(features, original, input_size)  # type: ignore[arg-type]

    def export_embedding(self, embedding: SamEmbedding) -> np.ndarray:
        """``SamPredictor.get_image_embedding()`` as float32 numpy (CVAT's stock SAM plugin)."""
        return embedding.to_numpy()

    # -- per click ---------------------------------------------------------------------------

    def _mask_input(self, state: Any) -> torch.Tensor:
        size = tuple(self.model.prompt_encoder.mask_input_size)
        tensor = torch.as_tensor(state, dtype=torch.float32, device=self.device)
        if tensor.numel() != size[0] * size[1]:
            raise ValueError(f"SAM state must be {size} low-res logits, got {tuple(tensor.shape)}")
        return tensor.reshape(1, 1, *size)

    def decode(
        self, image: np.ndarray, embedding: SamEmbedding, prompt: Prompt, state: Any | None
    ) -> tuple[Segmentation, np.ndarray]:
        """``SamPredictor.predict`` for one prompt, continuing from ``state``.

        * First decode (``state is None``) with clicks: three candidate masks
          (``multimask_output=True``), the one with the best predicted IoU is kept.
        * A box alone: one mask (``multimask_output=False``, SAM's advice for boxes).
        * Later clicks: the previous best low-res logits go in as ``mask_input``, one mask out.

        ``prompt.previous_mask`` is ignored: SAM's ``mask_input`` is the decoder's own low-res
        *logits*, and a binary mask (even rescaled to ±logit values) is outside what the model
        was trained on and degrades its answers. The Engine rebuilds a missing state by replaying
        the click history instead (``replays_history``).

        Returns the mask at the image's size, its predicted IoU as score, and the chosen
        low-res logits (float32 ``[1, 1, 256, 256]`` numpy array) as the next state.
        """
        if not isinstance(embedding, SamEmbedding):
            raise TypeError(f"expected a SamEmbedding from {self.name}.encode, got {embedding!r}")
        check_embedding_matches(image, embedding.original_size)

        with torch.inference_mode():
            points = labels = box = mask_input = None
            if prompt.clicks:
                xy = np.array([[c.x, c.y] for c in prompt.clicks], dtype=np.float64)
                xy = self.transform.apply_coords(xy, embedding.original_size)
                coords = torch.as_tensor(xy, dtype=torch.float, device=self.device)[None, :, :]
                labels = torch.as_tensor(
                    [1 if c.positive else 0 for c in prompt.clicks],
                    dtype=torch.int,
                    device=self.device,
                )[None, :]
                points = (coords, labels)
            if prompt.box is not None:
                xyxy = self.transform.apply_boxes(
                    np.array(prompt.box.as_xyxy(), dtype=np.float64), embedding.original_size
                )
                box = torch.as_tensor(xyxy, dtype=torch.float, device=self.device)[None, :]
            if state is None:
                multimask = bool(prompt.clicks)  # a box alone is unambiguous enough
            else:
                mask_input = self._mask_input(state)
                multimask = False

            sparse, dense = self.model.prompt_encoder(points=points, boxes=box, masks=mask_input)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            best = int(torch.argmax(iou[0])) if multimask else 0
            logits = low_res[:, best : best + 1]
            # Upscaling is per channel, so doing only the chosen mask gives SamPredictor's pixels.
            upscaled = self.model.postprocess_masks(
                logits, embedding.input_size, embedding.original_size
            )
            mask = (upscaled[0, 0] > self.model.mask_threshold).cpu().numpy()
            score = float(iou[0, best])
            new_state = logits.float().cpu().numpy().copy()
        return Segmentation(mask=mask, score=score, model=self.name), new_state
