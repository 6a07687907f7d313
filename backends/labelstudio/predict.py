"""Label Studio ``/predict`` payloads ↔ tapmask prompts and regions (no HTTP, no models here)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends import masks
from backends.errors import InvalidRequest, PromptError, TooManyClicks, TooManyObjects
from backends.labelstudio.frames import Frame, check_declared_size
from backends.labelstudio.labelconfig import OUTPUT_TYPES, Control
from backends.prompts import Box, Click, Prompt, Segmentation, finite_number, short_repr
from backends.settings import MAX_CLICKS, MAX_OBJECTS


class Params(BaseModel):
    model_config = ConfigDict(extra="allow")
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    """The body Label Studio 1.23 posts to ``/predict``."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[dict[str, Any]] = Field(min_length=1)
    project: str | int | None = None
    label_config: str | None = None
    model_version: str | None = None
    params: Params | None = None

    @property
    def context(self) -> dict[str, Any] | None:
        return self.params.context if self.params else None

    @property
    def project_id(self) -> str | None:
        """``"12.1795267061"`` → ``"12"`` (Label Studio appends the project's creation time)."""
        return None if self.project is None else str(self.project).split(".")[0]


@dataclass
class ObjectRequest:
    """One object to segment: the clicks/box, on which image, under which label."""

    to_name: str
    label: str | None
    prompt_pct: list[tuple[str, dict[str, Any], bool]]  # (type, value, is_positive) in percent
    original_width: int
    original_height: int


def _label_of(item: dict[str, Any]) -> str | None:
    value = item.get("value") or {}
    for key in (item.get("type"), "keypointlabels", "rectanglelabels", "labels"):
        labels = value.get(key) if key else None
        if isinstance(labels, list) and labels:
            return str(labels[0])
    return None


def objects_from_context(context: dict[str, Any]) -> list[ObjectRequest]:
    """Smart keypoints → one object; each smart rectangle → one object of its own.

    The counts (``TAPMASK_MAX_OBJECTS``, ``TAPMASK_MAX_CLICKS``) and every declared size
    (``TAPMASK_MAX_PIXELS``) are checked here, before any image is fetched.
    """
    result = context.get("result")
    if not isinstance(result, list) or not result:
        raise InvalidRequest("params.context.result must be a non-empty list of regions")
    keypoints: list[dict[str, Any]] = []
    rectangles: list[dict[str, Any]] = []
    for index, item in enumerate(result):
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise InvalidRequest(f"context.result[{index}] is not a region with a value")
        kind = item.get("type")
        if kind == "keypointlabels":
            keypoints.append(item)
        elif kind == "rectanglelabels":
            rectangles.append(item)
        else:
            raise InvalidRequest(
                f"context.result[{index}] has type {short_repr(kind)}; smart tools send "
                "keypointlabels or rectanglelabels"
            )
    max_objects, max_clicks = int(MAX_OBJECTS), int(MAX_CLICKS)
    if len(rectangles) + bool(keypoints) > max_objects:
        raise TooManyObjects(
            f"{len(rectangles) + bool(keypoints)} objects in one request (each smart rectangle "
            f"is one, all keypoints together one); at most {max_objects} (TAPMASK_MAX_OBJECTS)"
        )
    if len(keypoints) > max_clicks:
        raise TooManyClicks(
            f"{len(keypoints)} keypoints on one object; at most {max_clicks} (TAPMASK_MAX_CLICKS)"
        )
    objects: list[ObjectRequest] = []
    if keypoints:
        first = keypoints[0]
        prompt = [
            ("keypoint", k["value"], k.get("is_positive") is not False)  # missing → positive
            for k in keypoints
        ]
        objects.append(object_request(first, prompt))
    for rect in rectangles:
        objects.append(object_request(rect, [("rectangle", rect["value"], True)]))
    return objects


def object_request(
    item: dict[str, Any], prompt: list[tuple[str, dict[str, Any], bool]]
) -> ObjectRequest:
    """One region's object: its image, label and declared size (checked), with ``prompt``."""
    width = finite_number(item.get("original_width"), "original_width", InvalidRequest)
    height = finite_number(item.get("original_height"), "original_height", InvalidRequest)
    if width < 1 or height < 1:
        raise InvalidRequest("original_width/original_height must be positive")
    width, height = round(width), round(height)
    check_declared_size(width, height)
    to_name = item.get("to_name")
    if not isinstance(to_name, str) or not to_name:
        raise InvalidRequest("region has no to_name")
    return ObjectRequest(to_name, _label_of(item), prompt, width, height)


def _fraction(value: dict[str, Any], key: str, kind: str) -> float:
    """A percent field of a region's value as a fraction (``InvalidRequest`` if unusable)."""
    return finite_number(value.get(key), f"{kind} {key}", InvalidRequest) / 100.0


def to_prompt(obj: ObjectRequest, frame: Frame) -> Prompt:
    """Percent of the declared frame → pixels of the decoded image (pixel centres at integers).

    Rectangles are rotated in the declared frame's pixels (Label Studio rotates around the
    top-left corner) and become the bounding box of their corners on the decoded image.
    """
    clicks: list[Click] = []
    box: Box | None = None
    for kind, value, positive in obj.prompt_pct:
        x = _fraction(value, "x", kind) * frame.width
        y = _fraction(value, "y", kind) * frame.height
        if kind == "keypoint":
            px, py = frame.point(x, y)
            clicks.append(Click(px - 0.5, py - 0.5, positive))
            continue
        w = _fraction(value, "width", kind) * frame.width
        h = _fraction(value, "height", kind) * frame.height
        if w < 0 or h < 0:
            raise PromptError("rectangle width/height must not be negative")
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        rotation = finite_number(
            value.get("rotation", 0) or 0, "rectangle rotation", InvalidRequest
        )
        angle = math.radians(rotation)
        if angle:  # Label Studio rotates around the top-left corner: use the bounding box
            rot = np.array(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
            )
            corners = corners @ rot.T
        corners = np.array([frame.point(cx + x, cy + y) for cx, cy in corners])
        x1, y1 = corners.min(axis=0)
        x2, y2 = corners.max(axis=0)
        box = Box(x1, y1, max(x1, x2 - 1.0), max(y1, y2 - 1.0))
    return Prompt(tuple(clicks), box)


def _region_id(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def answer_ids(task_id: Any, outputs: list[tuple[Control, str]], prompt: Prompt) -> set[str]:
    """The ids of the regions ``regions`` answered to the earlier clicks of this object (every
    prefix of its clicks but the whole): what a refining click must not start from."""
    return {
        _region_id(task_id, control.name, label, prompt.prefix(n).key())
        for n in range(1, len(prompt.clicks))
        for control, label in outputs
    }


def regions(
    seg: Segmentation,
    obj: ObjectRequest,
    outputs: list[tuple[Control, str]],
    frame: Frame,
    *,
    task_id: Any,
    prompt: Prompt,
    polygon_tolerance: float = 1.0,
) -> list[dict[str, Any]]:
    """The regions Label Studio renders for one segmented object: brush and/or polygon, one per
    ``(control, label)`` of ``outputs`` (``LabelConfig.outputs_for``), drawn at the declared
    size (``frame``)."""
    width, height = frame.width, frame.height
    mask = frame.mask(seg.mask)
    out: list[dict[str, Any]] = []
    for control, label in outputs:
        base = {
            "id": _region_id(task_id, control.name, label, prompt.key()),
            "from_name": control.name,
            "to_name": obj.to_name,
            "type": control.type,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "score": seg.score,
            "readonly": False,
        }
        value = region_value(mask, control.type, label, polygon_tolerance)
        if value is not None:
            out.append({**base, "value": value})
    return out


def region_value(
    mask: np.ndarray, control_type: str, label: str, polygon_tolerance: float = 1.0
) -> dict[str, Any] | None:
    """A region's ``value`` for ``mask`` (H×W, drawn at the region's original size) in a
    brush or polygon control: brush RLE, or the largest outline as percent points (None when
    it has fewer than 3 points)."""
    assert control_type in OUTPUT_TYPES
    if control_type == "brushlabels":
        return {"format": "rle", "rle": masks.mask_to_ls_rle(mask), "brushlabels": [label]}
    height, width = mask.shape
    points = masks.largest_polygon(mask, polygon_tolerance)
    if len(points) < 3:
        return None
    centred = np.asarray(points, dtype=np.float64) + 0.5  # pixel centres → LS edges
    return {
        "points": masks.polygon_to_percent(centred, width, height),
        "closed": True,
        "polygonlabels": [label],
    }
