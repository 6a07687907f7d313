"""What a model family implements: the ``Segmenter`` protocol, in the spirit of ``SamPredictor``,
and the optional capabilities the Engine uses when a model has them. A new family reads this file.

A model splits its work in two, so the Engine can cache the expensive half:

* ``encode(image)`` runs once per image and returns an opaque *embedding* (SAM: the image
  encoder's output; GrabCut and RITM: ``None``, they have no separable encoder). The Engine caches
  it by (model, image sha256) and accounts its bytes (an ``nbytes`` attribute, else an estimate).
* ``decode(image, embedding, prompt, state)`` turns the clicks into a mask. ``state`` is what the
  same model returned for the same image and the same prompt minus its last click (SAM: the best
  low-resolution logits; RITM: the previous probability map and zoom-in ROI), or ``None`` for a
  first click. It returns the segmentation and the state to keep for the next click.

``replays_history`` tells the Engine whether a model's answer depends on the whole click history
(SAM, RITM, GrabCut, which anchors later clicks to the previous answer): then a missing state
is rebuilt by decoding every earlier prefix in order, so the result never depends on what
happened to be cached. A model whose answer is a function of the current prompt alone says
``False``.

Optional, each detected by the Engine with ``isinstance`` (the methods' presence) or a class
attribute read through the functions at the end of this module:

* ``SharesEmbeddings``: the embedding to and from bytes, so workers share it through the Engine's
  shared tier (Redis) instead of each encoding the same image;
* ``ExportsEmbedding``: the raw image embedding as a numpy array (CVAT's stock SAM plugin decodes
  SAM's ``[1, 256, 64, 64]`` embedding in the browser);
* ``EncodesBatches``: several images through the encoder in one pass (a GPU worker encodes the
  images waiting in its queues together); results equal one-by-one encodes within float
  tolerance;
* ``MovesEmbeddings``: an embedding to host memory and back (the Engine's host spill tier keeps
  what the device tier evicts);
* ``ReleasesMemory``: return the device allocator's cached memory (after an out-of-memory);
* ``accepts_box``: ``False`` for a model that cannot take a box without clicks (RITM): the
  Engine then starts replaying a history at its first click. Default ``True``;
* ``progressive_default``: whether the Engine's progressive mode (``backends.progressive``: a
  later click changes the mask only near itself) is on for this model unless
  ``TAPMASK_PROGRESSIVE`` says otherwise. Default ``False``: turn it on where it measures better.
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


@runtime_checkable
class SharesEmbeddings(Protocol):
    """A model whose embeddings can cross processes. The bytes may be lossy (SAM: fp16) but
    must round-trip to an embedding this model decodes; a foreign, truncated or other-size
    entry must raise (any exception: the Engine then counts a miss and encodes)."""

    def embedding_to_bytes(self, embedding: Any) -> bytes: ...

    def embedding_from_bytes(self, data: bytes) -> Any: ...


@runtime_checkable
class ExportsEmbedding(Protocol):
    """A model whose embedding has a raw array form tools consume."""

    def export_embedding(self, embedding: Any) -> np.ndarray: ...


@runtime_checkable
class EncodesBatches(Protocol):
    """A model that encodes several images in one pass (one embedding per image, in order)."""

    def encode_batch(self, images: list[np.ndarray]) -> list[Any]: ...


@runtime_checkable
class MovesEmbeddings(Protocol):
    """A model whose embeddings live on an accelerator and can wait in host memory."""

    def embedding_to_host(self, embedding: Any) -> Any: ...

    def embedding_to_device(self, embedding: Any) -> Any: ...


@runtime_checkable
class ReleasesMemory(Protocol):
    """A model that can hand its device allocator's cached blocks back (after an OOM)."""

    def release_memory(self) -> None: ...


def accepts_box(model: Segmenter) -> bool:
    """Whether a box with no clicks is a prompt ``model`` decodes: its ``accepts_box`` class
    attribute, True for models that do not declare one."""
    return bool(getattr(model, "accepts_box", True))


def progressive_default(model: Segmenter) -> bool:
    """Whether progressive mode is on for ``model`` when the settings do not name it: its
    ``progressive_default`` class attribute, False for models that do not declare one."""
    return bool(getattr(model, "progressive_default", False))
