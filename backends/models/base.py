"""The one small surface every model family implements, in the spirit of ``SamPredictor``.

A model splits its work in two, so the Engine can cache the expensive half:

* ``encode(image)`` runs once per image and returns an opaque *embedding* (SAM: the image
  encoder's output; GrabCut and RITM: ``None``, they have no separable encoder). The Engine caches
  it by (model, image sha256) and accounts its bytes.
* ``decode(image, embedding, prompt, state)`` turns the clicks into a mask. ``state`` is what the
  same model returned for the same image and the same prompt minus its last click (SAM: the best
  low-resolution logits; RITM: the previous probability map and zoom-in ROI), or ``None`` for a
  first click. It returns the segmentation and the state to keep for the next click.

``replays_history`` tells the Engine whether a model's answer depends on the whole click history
(SAM, RITM): then a missing state is rebuilt by decoding every earlier prefix in order, so the
result never depends on what happened to be cached. Models whose answer is a function of the
current prompt alone (GrabCut, which only uses the state to speed up refinement) say ``False``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from backends.prompts import Prompt, Segmentation


@runtime_checkable
class Segmenter(Protocol):
    name: str
    replays_history: bool

    def encode(self, image: np.ndarray) -> Any:
        """Per-image work, done once and cached (``image``: H×W×3 uint8 RGB)."""
        ...

    def decode(
        self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any | None
    ) -> tuple[Segmentation, Any]:
        """Per-click work: the mask for ``prompt`` and the state to continue from."""
        ...
