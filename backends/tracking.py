"""The tracking service: per-object tracker states behind unguessable handles.

Tools send one frame per request and get back, per object, a *handle* to hand in with the next
frame (CVAT keeps it in the browser as the function's ``states``; Label Studio's backend keeps
it in memory). The state behind a handle lives in this process's LRU cache (bytes-bounded) and,
with a shared tier (Redis, ``RedisEmbeddingStore`` with the ``trk`` tier), as the tracker's
serialisation, so the next frame can be served by any worker of the pool.

A box moves with the object: a tool's box is usually looser than the object and the mask found
in it may be partial (a box says little about what is inside), so a box target's answers are its
box carried along: shifted by the motion of the tracked mask's centroid and scaled by the change
of its area (at most ±10 % a frame, so an occluded frame does not collapse it). The first answer
is the tool's own box. Other targets' boxes are the tracked mask's bounding box.

Every answer gets a fresh handle naming an immutable state: a tool that steps back a frame and
tracks again continues from the state it holds. A handle that is malformed (length, charset),
unknown, expired, from another tracker or for another frame size re-initialises the tracker from
the shape the tool sent with it: logged, never an error (the tool's shape is always a valid
place to start from).
"""

from __future__ import annotations

import logging
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.cache import LRUCache, nbytes
from backends.embedding_cache import SharedEmbeddings
from backends.masks import mask_bbox
from backends.models.tracking import SharesTrackState, Tracked, Tracker
from backends.prompts import Box, TrackAnswer, TrackTarget, valid_handle

log = logging.getLogger(__name__)

#: Header of a state in the shared tier: magic, frame width, frame height, box anchor.
_HEADER = struct.Struct("<4sII7f")
_MAGIC = b"TMT2"
#: A box target's box and its mask's centroid and area (x1, y1, x2, y2, cx, cy, area);
#: all zero for other targets.
Anchor = tuple[float, float, float, float, float, float, float]
_NO_ANCHOR: Anchor = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
#: The most a carried box grows or shrinks in one frame.
_MAX_SCALE_STEP = 1.1


@dataclass
class TrackingStats:
    started: int = 0  # objects initialised from their shape (null or unusable handle)
    stepped: int = 0  # objects followed from a state
    shared_hits: int = 0  # states taken from the shared tier
    refused_handles: int = 0  # malformed, unknown or expired handles (re-initialised)


@dataclass(frozen=True, eq=False)
class _Entry:
    state: Any
    width: int
    height: int
    size: int
    anchor: Anchor = _NO_ANCHOR


def new_handle() -> str:
    """24 URL-safe characters from 18 random bytes (144 bits): unguessable."""
    return secrets.token_urlsafe(18)


class TrackingService:
    """States by (tracker name, handle): a local LRU and an optional shared tier."""

    def __init__(self, cache_bytes: int, shared: SharedEmbeddings | None = None) -> None:
        self.states: LRUCache[_Entry] = LRUCache(cache_bytes, "track-states")
        self.shared = shared
        self.stats = TrackingStats()

    def track(
        self, name: str, tracker: Tracker, image: np.ndarray, targets: list[TrackTarget]
    ) -> list[TrackAnswer]:
        """Each target on ``image``: stepped from its state, else started from its shape.
        The caller holds the tracker's lock and has validated the targets."""
        height, width = image.shape[:2]
        answers = []
        for target in targets:
            entry = self._load(name, tracker, target.state, width, height)
            if entry is None:
                tracked, state = tracker.start(image, target)
                anchor = _anchor(target.box, tracked) if target.box is not None else _NO_ANCHOR
                self.stats.started += 1
            else:
                tracked, state = tracker.step(image, entry.state)
                anchor = _carried(entry.anchor, tracked, width, height)
                self.stats.stepped += 1
            answers.append(self._answer(name, tracker, tracked, state, (width, height), anchor))
        return answers

    def _answer(
        self,
        name: str,
        tracker: Tracker,
        tracked: Tracked,
        state: Any,
        frame: tuple[int, int],
        anchor: Anchor,
    ) -> TrackAnswer:
        handle = new_handle()
        width, height = frame
        data = None
        if self.shared is not None and isinstance(tracker, SharesTrackState):
            data = _HEADER.pack(_MAGIC, width, height, *anchor) + tracker.state_to_bytes(state)
        size = nbytes(state) if data is None else max(len(data), nbytes(state))
        self.states.put((name, handle), _Entry(state, width, height, size, anchor), size)
        if data is not None and self.shared is not None:
            self.shared.put(name, handle, data)
        box: Box | None = None
        if anchor[6] > 0:
            box = Box(*anchor[:4])
        elif not tracked.lost:
            bbox = mask_bbox(tracked.mask)
            box = Box(*bbox) if bbox is not None else None
        return TrackAnswer(
            state=handle,
            mask=tracked.mask,
            box=None if tracked.lost else box,
            score=tracked.score,
            lost=tracked.lost,
        )

    def _load(
        self, name: str, tracker: Tracker, handle: Any, width: int, height: int
    ) -> _Entry | None:
        if handle is None:
            return None
        if not valid_handle(handle):
            self.stats.refused_handles += 1
            log.info("tracking %s: malformed state handle ignored; initialising", name)
            return None
        entry = self.states.get((name, handle))
        if entry is None:
            entry = self._from_shared(name, tracker, handle)
        if entry is None:
            self.stats.refused_handles += 1
            log.info("tracking %s: state %s… unknown or expired; initialising", name, handle[:6])
            return None
        if (entry.width, entry.height) != (width, height):
            self.stats.refused_handles += 1
            log.info("tracking %s: state %s… is for another frame size", name, handle[:6])
            return None
        return entry

    def _from_shared(self, name: str, tracker: Tracker, handle: str) -> _Entry | None:
        if self.shared is None or not isinstance(tracker, SharesTrackState):
            return None
        data = self.shared.get(name, handle)
        if data is None or len(data) < _HEADER.size:
            return None
        try:
            magic, width, height, *values = _HEADER.unpack_from(data)
            if magic != _MAGIC:
                return None
            state = tracker.state_from_bytes(bytes(data[_HEADER.size :]))
        except Exception:  # foreign or truncated bytes: start over from the shape
            log.warning("tracking %s: shared state %s… unreadable", name, handle[:6])
            return None
        self.stats.shared_hits += 1
        x1, y1, x2, y2, cx, cy, area = (float(v) for v in values)
        entry = _Entry(state, width, height, len(data), (x1, y1, x2, y2, cx, cy, area))
        self.states.put((name, handle), entry, entry.size)
        return entry


def _centroid(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return 0.0, 0.0, 0.0
    return float(xs.mean()), float(ys.mean()), float(xs.size)


def _anchor(box: Box, tracked: Tracked) -> Anchor:
    cx, cy, area = _centroid(tracked.mask)
    if area == 0:  # nothing found in the box: carry it from its own centre
        cx, cy, area = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2, 1.0
    return (box.x1, box.y1, box.x2, box.y2, cx, cy, area)


def _carried(anchor: Anchor, tracked: Tracked, width: int, height: int) -> Anchor:
    """The box of ``anchor`` moved with the mask's centroid and scaled with its area."""
    x1, y1, x2, y2, cx, cy, area = anchor
    if area <= 0:
        return anchor
    ncx, ncy, narea = _centroid(tracked.mask)
    if tracked.lost or narea == 0:
        return anchor  # stays where it was last seen
    scale = float(np.clip(np.sqrt(narea / area), 1 / _MAX_SCALE_STEP, _MAX_SCALE_STEP))
    half_w, half_h = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    mx, my = (x1 + x2) / 2 + (ncx - cx), (y1 + y2) / 2 + (ncy - cy)
    xa, xb = (float(np.clip(v, 0, width - 1)) for v in (mx - half_w, mx + half_w))
    ya, yb = (float(np.clip(v, 0, height - 1)) for v in (my - half_h, my + half_h))
    # Scale the remembered area by the applied scale only, so a clamped step catches up later.
    return (xa, ya, xb, yb, ncx, ncy, area * scale * scale)
