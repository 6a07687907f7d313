"""The TRACK job: one video frame and its tracked objects, dispatcher → worker and back.

Request (``TRACK_JOB`` on the tracker's interactive queue)::

    {"v": 1, "model": tracker, "image": sha256,
     "targets": [{"box": [x1, y1, x2, y2] | null, "polygon": [[x, y], …] | null,
                  "mask": COCO RLE | null, "clicks": [[x, y, positive], …],
                  "state": handle | null}, …]}

Reply: ``{"ok": true, "worker": …, "answers": [{"state": handle, "mask": COCO RLE,
"box": [x1, y1, x2, y2] | null, "score": s, "lost": bool}, …]}`` aligned with the targets.

The worker checks counts before parsing anything (``TAPMASK_MAX_TRACKED_OBJECTS`` targets,
``TAPMASK_MAX_SHAPE_POINTS`` vertices, a mask's pixels against ``TAPMASK_MAX_PIXELS``); a state
that is not a short string travels as null (the tracker re-initialises from the shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends import masks
from backends.errors import (
    PromptError,
    TooManyClicks,
    TooManyObjects,
    TooManyPoints,
    WorkerReplyError,
)
from backends.prompts import TRACK_HANDLE_MAX_CHARS, Box, Click, TrackAnswer, TrackTarget
from backends.redis.protocol import (
    PROTOCOL_VERSION,
    check_image_key,
    check_model_name,
    check_rle_mask,
    ok_reply,
    request_dict,
)
from backends.settings import MAX_CLICKS, MAX_SHAPE_POINTS, MAX_TRACKED_OBJECTS


def target_to_dict(target: TrackTarget) -> dict[str, Any]:
    state = target.state
    return {
        "box": list(target.box.as_xyxy()) if target.box is not None else None,
        "polygon": [list(p) for p in target.polygon] if target.polygon is not None else None,
        "mask": masks.mask_to_coco_rle(target.mask) if target.mask is not None else None,
        "clicks": [[c.x, c.y, c.positive] for c in target.clicks],
        "state": state
        if isinstance(state, str) and len(state) <= 4 * TRACK_HANDLE_MAX_CHARS
        else None,
    }


def target_from_dict(data: Any) -> TrackTarget:
    if not isinstance(data, dict):
        raise PromptError("each tracked object must be {box, polygon, mask, state}")
    box_values, polygon, rle = data.get("box"), data.get("polygon"), data.get("mask")
    state, clicks = data.get("state"), data.get("clicks") or []
    if not isinstance(clicks, list):
        raise PromptError("a tracked object's clicks must be a list of [x, y, positive]")
    if len(clicks) > int(MAX_CLICKS):
        raise TooManyClicks(
            f"a tracked object has {len(clicks)} clicks; at most {int(MAX_CLICKS)} "
            "(TAPMASK_MAX_CLICKS)"
        )
    if box_values is not None and (not isinstance(box_values, list) or len(box_values) != 4):
        raise PromptError("a tracked object's box must be [x1, y1, x2, y2] or null")
    if polygon is not None:
        if not isinstance(polygon, list):
            raise PromptError("a tracked object's polygon must be a list of [x, y]")
        limit = int(MAX_SHAPE_POINTS)
        if len(polygon) > limit:
            raise TooManyPoints(
                f"a polygon has {len(polygon)} points; at most {limit} (TAPMASK_MAX_SHAPE_POINTS)"
            )
    try:
        box = Box(*box_values) if box_values is not None else None
        return TrackTarget(
            box=box,
            polygon=tuple(polygon) if polygon is not None else None,
            mask=check_rle_mask(rle) if rle is not None else None,
            state=state if isinstance(state, str) else None,
            clicks=tuple(_click(c) for c in clicks),
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PromptError):
            raise
        raise PromptError(f"malformed tracked object: {str(exc)[:200]}") from exc


def _click(value: Any) -> Click:
    if not isinstance(value, list) or len(value) != 3:
        raise PromptError("a click must be [x, y, positive]")
    return Click(value[0], value[1], bool(value[2]))


@dataclass(frozen=True, eq=False)
class TrackJob:
    """Follow ``targets`` onto one frame with video tracker ``model``."""

    model: str
    image: str
    targets: tuple[TrackTarget, ...]

    def to_payload(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "model": self.model,
            "image": self.image,
            "targets": [target_to_dict(t) for t in self.targets],
        }

    @classmethod
    def from_payload(cls, data: Any) -> TrackJob:
        data = request_dict(data)
        model, image = check_model_name(data.get("model")), check_image_key(data.get("image"))
        targets = data.get("targets")
        if not isinstance(targets, list):
            raise PromptError("the job's targets must be a list")
        limit = int(MAX_TRACKED_OBJECTS)
        if len(targets) > limit:
            raise TooManyObjects(
                f"the job tracks {len(targets)} objects; at most {limit} "
                "(TAPMASK_MAX_TRACKED_OBJECTS)"
            )
        return cls(model, image, tuple(target_from_dict(t) for t in targets))


def track_reply(answers: list[TrackAnswer], worker: str) -> dict[str, Any]:
    return ok_reply(
        worker,
        answers=[
            {
                "state": a.state,
                "mask": masks.mask_to_coco_rle(a.mask),
                "box": list(a.box.as_xyxy()) if a.box is not None else None,
                "score": a.score,
                "lost": a.lost,
            }
            for a in answers
        ],
    )


def parse_track_reply(payload: dict[str, Any], expected: int) -> list[TrackAnswer]:
    try:
        answers = [
            TrackAnswer(
                state=str(item["state"]),
                mask=masks.coco_rle_to_mask(item["mask"]),
                box=Box(*item["box"]) if item.get("box") is not None else None,
                score=float(item["score"]),
                lost=bool(item["lost"]),
            )
            for item in payload["answers"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkerReplyError(f"malformed track reply from the worker: {exc}") from exc
    if len(answers) != expected:
        raise WorkerReplyError(f"the worker answered {len(answers)} objects, {expected} sent")
    return answers
