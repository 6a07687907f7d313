"""What a video tracker implements: the ``Tracker`` protocol (a new tracker family reads this).

A tracker follows one object from frame to frame. Tools send one frame per request (CVAT's
tracker functions, Label Studio's video regions), so a tracker never sees the whole video: it
keeps everything it needs about the past in a *state* object, which the tracking service
(``backends.tracking``) stores under an unguessable handle between requests.

* ``start(image, target)``: initialise on this frame from the target's shape (a box, a polygon
  or a mask, already validated against the frame; ``target.shape_mask`` rasterises it). Returns
  the object on this frame and the state to continue from.
* ``step(image, state)``: the object on the next frame the tool sends (forward or backward in
  time: a tracker only sees "the next frame asked for"). Returns the object and the new state.
  A state must not be mutated in place: the service may hand the same state to two requests
  (a tool that steps back and tracks again), and each must see the state it was given.

States must stay bounded however long the video is (SAM 2's memory bank keeps a fixed number of
frames, the flow tracker one frame), and a tracker whose states can cross processes implements
``SharesTrackState`` so any worker of a pool can serve the next frame (fp16 for tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from backends.prompts import TrackTarget


@dataclass(eq=False)
class Tracked:
    """A tracker's view of the object on one frame: full-frame boolean mask, confidence,
    and whether the object is lost (left the frame, hidden, or collapsed)."""

    mask: np.ndarray = field(repr=False)
    score: float
    lost: bool = False

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self.score = float(self.score)
        self.lost = bool(self.lost) or not self.mask.any()
        if self.lost:
            self.mask = np.zeros_like(self.mask)


@runtime_checkable
class Tracker(Protocol):
    name: str

    def start(self, image: np.ndarray, target: TrackTarget) -> tuple[Tracked, Any]:
        """Initialise from ``target``'s shape on ``image`` (H×W×3 uint8 RGB)."""
        ...

    def step(self, image: np.ndarray, state: Any) -> tuple[Tracked, Any]:
        """Follow the object onto ``image``, the next frame asked for."""
        ...


@runtime_checkable
class SharesTrackState(Protocol):
    """A tracker whose states can cross processes (the shared Redis tier). The bytes may be
    lossy (fp16) but must round-trip to a state this tracker steps from; foreign or truncated
    bytes must raise (any exception: the service then re-initialises from the shape)."""

    def state_to_bytes(self, state: Any) -> bytes: ...

    def state_from_bytes(self, data: bytes) -> Any: ...


def is_tracker(model: Any) -> bool:
    """Whether ``model`` (anything the registry built) tracks video rather than segmenting."""
    return isinstance(model, Tracker) and not hasattr(model, "decode")
