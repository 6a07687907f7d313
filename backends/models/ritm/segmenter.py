"""RITM behind the tool-neutral :class:`~backends.models.base.Segmenter` surface.

* ``encode`` returns None: RITM has no separable image encoder (every click runs the whole
  network on the zoomed-in crop), and caching a float copy of a big frame would cost more
  memory than the conversion saves.
* ``decode`` runs one official predictor step for the *last* click of the prompt, continuing
  from ``state`` (the previous probability map and zoom-in ROI, see :class:`RitmState`). If the
  state is missing or does not belong to the prompt minus its last click, the earlier clicks
  are replayed first, so the answer never depends on what was cached.

Conventions:

* Clicks arrive as float pixels ``Click(x=col, y=row)``; the official code works with integer
  ``(row, col)`` pixels (its clicker and GUI produce integers), so each coordinate is rounded to
  the nearest pixel, halves up (``floor(v + 0.5)``), and clamped into the image.
* A box is not an RITM input: a prompt with only a box is refused with :class:`PromptError`; a
  box that comes with clicks is ignored (the clicks alone define the object). ``accepts_box =
  False`` tells a caller not to decode a box-only prefix of such a prompt.
* ``prompt.previous_mask`` (a mask the caller already has) replaces the history, as the Engine
  expects: all clicks go through one official step on a fresh predictor, with the mask as the
  network's previous-mask input (``get_prediction(clicker, prev_mask)`` in the official code);
  ``state`` is then not used.
* ``Segmentation.mask = probs > 0.49`` (the official ``prob_thresh``); ``score`` is the mean
  probability over the mask pixels (0 for an empty mask), a rough confidence in [0.49, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.errors import ImageError, PromptError
from backends.models.ritm.model import RitmConfig
from backends.models.ritm.predictor import NetClick, PredictorState, RitmPredictor
from backends.prompts import Click, Prompt, Segmentation


@dataclass
class RitmState:
    """Everything needed to continue an interaction after ``clicks`` on an image of ``shape``."""

    clicks: tuple[NetClick, ...]
    shape: tuple[int, int]
    predictor: PredictorState

    @property
    def nbytes(self) -> int:
        return self.predictor.nbytes

    @property
    def probs(self) -> np.ndarray:
        """The full-image probability map after the last click (float32 H×W)."""
        return self.predictor.probs


def _round_half_up(value: float, size: int) -> int:
    return min(max(math.floor(value + 0.5), 0), size - 1)


def to_net_click(click: Click, height: int, width: int) -> NetClick:
    """``Click(x=col, y=row)`` floats → official integer ``(row, col)``, nearest pixel."""
    return NetClick(_round_half_up(click.y, height), _round_half_up(click.x, width), click.positive)


class RitmSegmenter:
    """One RITM network with the official NoBRS predictor (zoom-in, flip averaging)."""

    replays_history = True
    accepts_box = False

    def __init__(
        self,
        name: str,
        predictor: RitmPredictor,
        config: RitmConfig | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        self.name = name
        self.predictor = predictor
        self.config = config
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        return f"RitmSegmenter({self.name!r}, checkpoint={self.checkpoint}, config={self.config})"

    def encode(self, image: np.ndarray) -> None:
        return None

    @staticmethod
    def _check_image(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(
                f"RITM needs an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}"
            )
        return image

    def net_clicks(self, prompt: Prompt, height: int, width: int) -> tuple[NetClick, ...]:
        if not prompt.clicks:
            raise PromptError(
                "ritm does not take a box: give at least one click (a box alongside clicks is "
                "ignored)"
            )
        return tuple(to_net_click(c, height, width) for c in prompt.clicks)

    def decode(
        self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any | None
    ) -> tuple[Segmentation, RitmState]:
        image = self._check_image(image)
        height, width = image.shape[:2]
        clicks = self.net_clicks(prompt, height, width)

        if prompt.previous_mask is not None:
            result = self.predictor.step(image, clicks, None, prev_mask=prompt.previous_mask)
            return self._segmentation(result.probs, result.info.roi), RitmState(
                clicks, (height, width), result.state
            )

        previous: PredictorState | None = None
        start = len(clicks) - 1
        if (
            isinstance(state, RitmState)
            and state.shape == (height, width)
            and state.clicks == clicks[:-1]
        ):
            previous = state.predictor
        else:
            start = 0  # no usable state: replay every prefix, as the official loop would
        result = None
        for n in range(start + 1, len(clicks) + 1):
            result = self.predictor.step(image, clicks[:n], previous)
            previous = result.state
        assert result is not None
        return self._segmentation(result.probs, result.info.roi), RitmState(
            clicks, (height, width), result.state
        )

    def _segmentation(self, probs: np.ndarray, roi: Sequence[int] | None) -> Segmentation:
        mask = probs > self.predictor.prob_thresh
        score = float(probs[mask].mean()) if mask.any() else 0.0
        extra = {"zoom_roi": [int(v) for v in roi] if roi is not None else None}
        return Segmentation(mask=mask, score=score, model=self.name, extra=extra)
