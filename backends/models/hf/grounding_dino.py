"""Grounding DINO (``GroundingDinoForObjectDetection``) as a ``Detector``: phrases → boxes.

The model loads like every transformers family here (``loading.load_checked``: a local directory
of ``config.json`` + ``model.safetensors``, ``model_type`` and size checked, every weight
present, no pickle), plus its text tokenizer (BERT's: ``tokenizer.json`` or ``vocab.txt``) and
its image processor settings (``preprocessor_config.json``; the class defaults otherwise, which
are the official ones: shortest edge 800, longest 1333).

How a box gets its phrase. The text is the phrases joined the way Grounding DINO was trained
(``"car . truck ."``), tokenized phrase by phrase so each phrase's token span is known exactly.
For each of the model's queries the score of a phrase is the highest sigmoid probability over its
tokens; the query's score is its best phrase's, and the query becomes a ``Detection`` of that
phrase when the score reaches ``box_threshold`` and ``text_threshold`` (transformers'
``post_process_grounded_object_detection`` instead takes the maximum over every token, separators
included, and names the phrase by decoding the tokens over ``text_threshold``, which can glue two
phrases together; spans keep one box, one phrase).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.errors import ModelLoadError, TextPromptTooLong
from backends.models.detection import Detection, check_prompts
from backends.models.hf import HfModel, model_directory
from backends.models.hf.loading import load_checked, load_image_processor
from backends.models.torch_utils import auto_device, rgb
from backends.prompts import Box

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def default_config(info: HfModel | None = None, **overrides: Any) -> Any:
    """The official architecture as a ``GroundingDinoConfig``: transformers' defaults are
    Grounding DINO Swin-T with BERT-base; ``base`` swaps in Swin-B (window 12, 384 px)."""
    import transformers

    if info is not None and info.variant == "base":
        overrides.setdefault(
            "backbone_config",
            transformers.SwinConfig(
                embed_dim=128,
                depths=[2, 2, 18, 2],
                num_heads=[4, 8, 16, 32],
                window_size=12,
                image_size=384,
                out_indices=[2, 3, 4],
                out_features=["stage2", "stage3", "stage4"],
            ),
        )
    return transformers.GroundingDinoConfig(**overrides)


def random_tokenizer(config: Any, vocabulary: Sequence[str] = ()) -> Any:
    """A BERT tokenizer for a random-weight model: BERT's special tokens, ``.``,
    ``vocabulary`` (lower-cased) and fillers up to the text model's vocabulary size."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
    words += [w.lower() for w in dict.fromkeys(vocabulary) if w.lower() not in words]
    size = int(config.text_config.vocab_size)
    if len(words) > size:
        raise ValueError(f"{len(words)} words do not fit a {size}-token text model")
    words += [f"[unused{i}]" for i in range(size - len(words))]
    return BertTokenizer(vocab={word: i for i, word in enumerate(words)})


def save_random_model(
    directory: str | os.PathLike[str],
    config: Any = None,
    vocabulary: Sequence[str] = (),
    seed: int = 0,
    image_size: dict[str, int] | None = None,
) -> Path:
    """A Grounding DINO with random (seeded) weights saved as the hub stores one: config,
    safetensors, image processor settings and a ``random_tokenizer``. Tests load it through the
    real loader; nothing is downloaded. ``image_size``: the image processor's resize (default
    the official shortest edge 800, longest 1333)."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor

    config = config if config is not None else default_config()
    torch.manual_seed(seed)
    target = Path(directory)
    GroundingDinoForObjectDetection(config).save_pretrained(str(target))
    random_tokenizer(config, vocabulary).save_pretrained(str(target))
    processor = GroundingDinoImageProcessor(**({"size": image_size} if image_size else {}))
    processor.save_pretrained(str(target))
    return target


class GroundingDinoDetector:
    """``Detector`` over a loaded ``GroundingDinoForObjectDetection`` (eval mode, float32)."""

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        name: str,
        device: str | torch.device | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        self.name = name
        self.device = auto_device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))
        self._dot = int(tokenizer.convert_tokens_to_ids("."))

    def _text(self, phrases: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``[CLS] p1 . p2 . … [SEP]`` and each phrase's token span."""
        ids = [int(self.tokenizer.cls_token_id)]
        spans: list[tuple[int, int]] = []
        for phrase in phrases:
            tokens = self.tokenizer(phrase, add_special_tokens=False)["input_ids"]
            tokens = tokens or [int(self.tokenizer.unk_token_id)]
            spans.append((len(ids), len(ids) + len(tokens)))
            ids += [*tokens, self._dot]
        ids.append(int(self.tokenizer.sep_token_id))
        if len(ids) > self.max_text_len:
            raise TextPromptTooLong(
                f"the text prompts make {len(ids)} tokens; {self.name} reads at most "
                f"{self.max_text_len}"
            )
        return ids, spans

    @torch.inference_mode()
    def detect(
        self,
        image: np.ndarray,
        prompts: Sequence[str],
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detection]:
        phrases = check_prompts(prompts)
        ids, spans = self._text(phrases)
        height, width = image.shape[:2]
        array = rgb(image)
        array = array if array.flags.writeable else array.copy()  # torch wants writable
        pixels = self.image_processor(images=array, return_tensors="pt")
        input_ids = torch.tensor([ids], device=self.device)
        outputs = self.model(
            pixel_values=pixels["pixel_values"].to(self.device),
            pixel_mask=pixels["pixel_mask"].to(self.device),
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            token_type_ids=torch.zeros_like(input_ids),
        )
        probs = outputs.logits[0, :, : len(ids)].float().sigmoid()
        per_phrase = torch.stack([probs[:, a:b].max(dim=1).values for a, b in spans], dim=1)
        scores, index = per_phrase.max(dim=1)
        keep = (scores >= box_threshold) & (scores >= text_threshold)
        cx, cy, w, h = outputs.pred_boxes[0].float().unbind(-1)
        corners = torch.stack(
            [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width - 1,
                (cy + h / 2) * height - 1,
            ],
            dim=-1,
        )
        found: list[Detection] = []
        for q in torch.nonzero(keep).flatten().tolist():
            x1, y1, x2, y2 = corners[q].tolist()
            x1, x2 = min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)
            y1, y2 = min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)
            box = Box(x1, y1, max(x1, x2), max(y1, y2))
            found.append(Detection(int(index[q]), box, float(scores[q])))
        found.sort(key=lambda d: -d.score)
        return found


def _load_tokenizer(info: HfModel, directory: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory} has no text tokenizer ({' or '.join(TOKENIZER_FILES)}): {info.name!r} "
            "needs the tokenizer files of its hub repository"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the tokenizer in {directory}: {exc}") from exc
    if "." not in tokenizer.get_vocab():
        raise ModelLoadError(f"the tokenizer in {directory} has no '.' token (phrase separator)")
    return tokenizer


def build(
    info: HfModel,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    check_variant: bool = True,
    random_weights: bool = False,
) -> GroundingDinoDetector:
    """The detector of ``info`` from its checked directory (``checkpoint``, else
    ``GROUNDING_DINO_MODEL_DIR``, else ``$TAPMASK_MODELS_DIR/<name>``). ``check_variant=False``
    accepts another size (tests build tiny configs); ``random_weights=True`` builds the official
    architecture untrained with a ``random_tokenizer``, reading no file (benchmarks)."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor

    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        config = default_config(info)
        model = GroundingDinoForObjectDetection(config).eval()
        processor = GroundingDinoImageProcessor()
        return GroundingDinoDetector(model, processor, random_tokenizer(config), info.name, device)
    directory = model_directory(info.name, checkpoint)
    model = load_checked(GroundingDinoForObjectDetection, info, directory, variant=check_variant)
    tokenizer = _load_tokenizer(info, directory)
    image_processor = load_image_processor(GroundingDinoImageProcessor, directory)
    return GroundingDinoDetector(model, image_processor, tokenizer, info.name, device, directory)
