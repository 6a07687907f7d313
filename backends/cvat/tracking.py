"""CVAT's tracker wire format (``metadata.annotations.type: tracker``): parse and reply.

Verified against CVAT's source (``cvat/apps/lambda_manager/views.py``, the UI's
``tools-control.tsx``, the stock TransT function); see ``serverless/README.md``:

* request ``{"image": base64, "shapes": [...], "states": [...]}``, one call per frame while the
  annotator steps forward. A shape is ``[x1, y1, x2, y2]`` (rectangles, every CVAT version) or
  ``{"type": "rectangle" | "polygon", "points": [x1, y1, x2, y2, …]}`` (newer CVAT). ``states``
  may be shorter than ``shapes`` (``[]`` on the initialising call of older UIs): a missing or
  ``null`` state initialises from the shape. Newer UIs may send the states without shapes.
* reply ``{"shapes": [...], "states": [...]}`` aligned by index, each shape in the form it came
  in. The CVAT server signs each state (``TimestampSigner``, 8 h) and hands it back parsed from
  JSON on the next call: it is still untrusted (an 8-hour-old handle may be long gone here).

A state here is ``{"h": handle, "s": shape}``: the handle of the tracker's state (see
``backends.tracking``) and the shape of this answer, so a request that brings states without
shapes still has a shape to re-initialise from. A lost object keeps the shape it was sent (CVAT
has no way to mark it outside from a tracker); the annotator moves it, and CVAT then sends a
null state for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.cvat.formats import decode_image, dumps
from backends.errors import PromptError, TooManyObjects, TooManyPoints
from backends.masks import largest_polygon
from backends.prompts import Box, TrackAnswer, TrackTarget, finite_number, short_repr
from backends.settings import MAX_SHAPE_POINTS, MAX_TRACKED_OBJECTS

#: What the tracker functions declare in ``supported_shape_types`` and accept.
SHAPE_TYPES = ("rectangle", "polygon")


@dataclass(frozen=True)
class CvatShape:
    """One shape as CVAT sent it: its type, flat points, and whether it came as a bare list."""

    type: str
    points: tuple[float, ...]
    bare: bool = False  # ``[x1, y1, x2, y2]`` instead of ``{"type", "points"}``

    def target(self, handle: Any) -> TrackTarget:
        if self.type == "rectangle":
            xa, ya, xb, yb = self.points[:4]
            box = Box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
            return TrackTarget(box=box, state=handle)
        pairs = tuple(zip(self.points[0::2], self.points[1::2], strict=True))
        return TrackTarget(polygon=pairs, state=handle)

    def to_json(self) -> Any:
        points = [round(v, 2) for v in self.points]
        return points if self.bare else {"type": self.type, "points": points}


@dataclass(frozen=True)
class TrackerRequest:
    image: bytes
    shapes: tuple[CvatShape, ...]
    targets: tuple[TrackTarget, ...]


def parse_shape(value: Any, what: str) -> CvatShape:
    if isinstance(value, (list, tuple)):
        kind, points, bare = "rectangle", value, True
    elif isinstance(value, Mapping):
        kind, points, bare = value.get("type"), value.get("points"), False
        if kind not in SHAPE_TYPES:
            raise PromptError(
                f"{what}: shape type {short_repr(kind)} is not tracked here; "
                f"supported: {', '.join(SHAPE_TYPES)}"
            )
    else:
        raise PromptError(f"{what}: expected [x1, y1, x2, y2] or {{type, points}}")
    if not isinstance(points, (list, tuple)):
        raise PromptError(f"{what}: points must be a flat list of numbers")
    limit = int(MAX_SHAPE_POINTS)
    if len(points) > 2 * limit:
        raise TooManyPoints(
            f"{what} has {len(points) // 2} points; at most {limit} (TAPMASK_MAX_SHAPE_POINTS)"
        )
    numbers = tuple(finite_number(v, f"{what}: points") for v in points)
    if kind == "rectangle" and len(numbers) != 4:
        raise PromptError(f"{what}: a rectangle is [x1, y1, x2, y2], got {len(numbers)} numbers")
    if kind == "polygon" and (len(numbers) < 6 or len(numbers) % 2):
        raise PromptError(f"{what}: a polygon needs at least 3 [x, y] points")
    return CvatShape(str(kind), numbers, bare)


def _state_parts(state: Any) -> tuple[Any, Any]:
    """``(handle, shape)`` of a state we issued; anything else gives ``(None, None)``."""
    if isinstance(state, Mapping):
        return state.get("h"), state.get("s")
    return None, None


def parse_tracker_request(data: Mapping[str, Any]) -> TrackerRequest:
    """Validate a tracker request (counts before contents; the image decoded last)."""
    shapes, states = data.get("shapes"), data.get("states")
    shapes = [] if shapes is None else shapes
    states = [] if states is None else states
    if not isinstance(shapes, list) or not isinstance(states, list):
        raise PromptError("'shapes' and 'states' must be lists")
    count = max(len(shapes), len(states))
    limit = int(MAX_TRACKED_OBJECTS)
    if count > limit:
        raise TooManyObjects(
            f"{count} objects to track; at most {limit} (TAPMASK_MAX_TRACKED_OBJECTS)"
        )
    if count == 0:
        raise PromptError("nothing to track: 'shapes' is empty")
    parsed: list[CvatShape] = []
    targets: list[TrackTarget] = []
    for index in range(count):
        handle, remembered = _state_parts(states[index] if index < len(states) else None)
        if index < len(shapes):
            shape = parse_shape(shapes[index], f"shapes[{index}]")
        elif remembered is not None:
            shape = parse_shape(remembered, f"states[{index}]")
        else:
            raise PromptError(f"object {index} has neither a shape nor a state with one")
        parsed.append(shape)
        targets.append(shape.target(handle if isinstance(handle, str) else None))
    return TrackerRequest(decode_image(data.get("image")), tuple(parsed), tuple(targets))


def answer_shape(sent: CvatShape, answer: TrackAnswer) -> CvatShape:
    """The answer in the form the shape came in; the shape sent when the object is lost."""
    if answer.lost or answer.box is None:
        return sent
    if sent.type == "rectangle":
        b = answer.box
        return CvatShape("rectangle", (b.x1, b.y1, b.x2, b.y2), sent.bare)
    polygon = largest_polygon(answer.mask, tolerance=1.5)
    if not polygon:
        return sent
    return CvatShape("polygon", tuple(float(v) for point in polygon for v in point), sent.bare)


def tracker_reply(request: TrackerRequest, answers: list[TrackAnswer]) -> str:
    shapes = [answer_shape(s, a) for s, a in zip(request.shapes, answers, strict=True)]
    return dumps(
        {
            "shapes": [shape.to_json() for shape in shapes],
            "states": [
                {"h": a.state, "s": shape.to_json()}
                for shape, a in zip(shapes, answers, strict=True)
            ],
        }
    )
