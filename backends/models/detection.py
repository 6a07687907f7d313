"""What an open-vocabulary detector implements: the ``Detector`` protocol, and the checks every
detector's text prompts pass before any work starts.

A detector turns an image and a list of short phrases (``["car", "truck", "person"]``) into
boxes, each tied to the phrase it matched. Pre-annotation (``backends.preannotate``) puts one in
front of a segmenter: boxes per label, then one mask per box. Detectors are named models of the
registry like segmenters (``registry.ModelSpec(kind="detector")``), loaded by the Engine and
served by the same workers; only the model families under ``backends/models/`` import torch.

The phrases are what Grounding DINO calls its caption split at ``.``: a phrase itself holds no
``.`` (``split_phrases`` splits a user's ``"car . truck"`` into two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from backends.errors import PromptError, TextPromptTooLong, TooManyTextPrompts
from backends.prompts import Box, finite_number
from backends.settings import MAX_TEXT_PROMPT_CHARS, MAX_TEXT_PROMPTS

#: Grounding DINO's published demo thresholds (a box's best phrase-token probability, and the
#: probability its matched phrase must reach).
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25


@dataclass(frozen=True)
class Detection:
    """One detected object: the index of the phrase it matched, its box in image pixels
    (corners inclusive, like every ``Box``) and the detector's confidence in [0, 1]."""

    prompt_index: int
    box: Box
    score: float


@dataclass(frozen=True)
class Thresholds:
    """A detector's two cut-offs (Grounding DINO's ``box_threshold`` / ``text_threshold``)."""

    box: float = DEFAULT_BOX_THRESHOLD
    text: float = DEFAULT_TEXT_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("box", "text"):
            value = finite_number(getattr(self, name), f"{name} threshold")
            if not 0.0 <= value <= 1.0:
                raise PromptError(f"{name} threshold must lie in [0, 1], got {value:g}")
            object.__setattr__(self, name, value)


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(
        self,
        image: np.ndarray,
        prompts: Sequence[str],
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detection]:
        """Boxes of the objects ``prompts`` name (``image``: H×W×3 uint8 RGB), best first."""
        ...


def split_phrases(text: str) -> list[str]:
    """``"car . truck."`` → ``["car", "truck"]``: Grounding DINO's phrase separator is ``.``."""
    return [part.strip() for part in text.split(".") if part.strip()]


def caption(prompts: Sequence[str]) -> str:
    """The detector text for ``prompts``, as Grounding DINO expects it: ``"car . truck ."``."""
    return " . ".join(prompts) + " ."


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The phrases, checked against ``TAPMASK_MAX_TEXT_PROMPTS`` and
    ``TAPMASK_MAX_TEXT_PROMPT_CHARS`` before an image is touched: non-empty strings without
    ``.`` or control characters."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise PromptError("text prompts must be a list of phrases")
    limit = int(MAX_TEXT_PROMPTS)
    if len(prompts) > limit:
        raise TooManyTextPrompts(
            f"{len(prompts)} text prompts for one image; at most {limit} (TAPMASK_MAX_TEXT_PROMPTS)"
        )
    if not prompts:
        raise PromptError("no text prompt: name at least one thing to detect")
    checked: list[str] = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"a text prompt must be a non-empty string, got {prompt!r:.60}")
        if "." in prompt or not prompt.isprintable():
            raise PromptError(
                f"text prompt {prompt[:60]!r} holds '.' or a control character "
                "('.' separates phrases)"
            )
        checked.append(" ".join(prompt.split()))
    chars, char_limit = len(caption(checked)), int(MAX_TEXT_PROMPT_CHARS)
    if chars > char_limit:
        raise TextPromptTooLong(
            f"the detector text is {chars} characters; at most {char_limit} "
            "(TAPMASK_MAX_TEXT_PROMPT_CHARS)"
        )
    return checked
