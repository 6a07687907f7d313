"""Label Studio ``videorectangle`` regions ↔ tapmask boxes and frames (no HTTP, no models).

What Label Studio 1.23's editor does with a video region (``web/libs/editor/src``: ``regions/
VideoRegion.js``, ``regions/VideoRectangleRegion.js``, ``components/VideoCanvas/VideoCanvas.tsx``,
``tags/object/Video/Video.js``), and so what this module reads and writes:

* a region is ``{"id", "type": "videorectangle", "from_name", "to_name", "value": {"framesCount",
  "duration", "sequence": [...], "labels": [...]}}``; ``sequence`` holds *keyframes* ``{"frame",
  "enabled", "rotation", "x", "y", "width", "height", "time"}``, x/y/width/height in percent of
  the video's frame, ``frame`` 1-based, ``time = frame / framerate``;
* between two keyframes the editor interpolates the box; a keyframe with ``enabled: false`` is
  still shown on its own frame and hides the region *after* it, until the next keyframe;
* frame ``f`` is shown by seeking the video to ``(f - 1) / framerate`` seconds (``goToFrame``
  with the frame-seek-precision flag, on in 1.23.2; the frame counter is ``ceil(time ×
  framerate)`` and the video has ``round(duration × framerate)`` frames), where ``framerate`` is
  ``<Video framerate>`` (a number or ``$key`` of task data; default 24, a value under 1 is
  inverted), *not* the container's: so ``f`` is the decoded frame at ``(f - 1) / framerate ×
  container fps`` (``frame_index``), frame 1 the first one. ``time`` is still written as
  ``f / framerate`` (``VideoRegion.serialize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backends.errors import InvalidRequest, TooManyObjects
from backends.labelstudio.labelconfig import DEFAULT_FRAMERATE, VideoTag
from backends.prompts import Box, finite_number, short_repr
from backends.settings import MAX_OBJECTS

#: Largest framerate taken from a config or task (Label Studio takes anything).
MAX_FRAMERATE = 1000.0
#: Decimals kept in percent coordinates (1e-4 % of a 4K frame is 0.004 px).
PERCENT_DIGITS = 4


@dataclass(frozen=True)
class Keyframe:
    frame: int
    enabled: bool
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0

    def box(self, width: int, height: int) -> Box:
        """This keyframe's rectangle in pixels of a ``width × height`` frame (corners
        inclusive, as ``Box`` has them)."""
        x1, y1 = self.x / 100 * width, self.y / 100 * height
        x2 = x1 + self.width / 100 * width - 1.0
        y2 = y1 + self.height / 100 * height - 1.0
        return Box(x1, y1, max(x1, x2), max(y1, y2))


@dataclass(frozen=True)
class VideoRegion:
    """One ``videorectangle`` region as Label Studio sends it (validated)."""

    id: str
    from_name: str
    to_name: str
    keyframes: tuple[Keyframe, ...]  # sorted by frame
    raw_sequence: tuple[dict[str, Any], ...]  # as sent, same order as keyframes
    value: dict[str, Any]  # the region's value (labels, framesCount, duration…)

    @property
    def labels(self) -> list[str] | None:
        labels = self.value.get("labels")
        return [str(v) for v in labels] if isinstance(labels, list) else None

    def start(self) -> Keyframe | None:
        """The keyframe to track from, or None when this region needs no tracking.

        That is the region's last keyframe, when the annotator placed it: a region that ends in
        two keyframes on consecutive frames was tracked already (tapmask writes one keyframe a
        frame; people draw a few), and a last keyframe with ``enabled: false`` ends the
        object's life on purpose.
        """
        last = self.keyframes[-1]
        if not last.enabled:
            return None
        if len(self.keyframes) >= 2 and self.keyframes[-2].frame == last.frame - 1:
            return None
        return last


def framerate(tag: VideoTag, data: dict[str, Any] | None) -> float:
    """The framerate Label Studio uses for this task (``Video.js``'s ``afterCreate``)."""
    text = tag.framerate or DEFAULT_FRAMERATE
    value = (data or {}).get(text[1:]) if text.startswith("$") else text
    try:
        rate = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        rate = float(DEFAULT_FRAMERATE)
    if not math.isfinite(rate) or rate <= 0:
        rate = float(DEFAULT_FRAMERATE)
    if rate < 1:
        rate = 1 / rate
    return min(rate, MAX_FRAMERATE)


def frame_index(frame: int, ls_fps: float, video_fps: float, frame_count: int) -> int:
    """The decoded frame (0-based) Label Studio shows as ``frame`` (1-based; see the module
    docstring)."""
    index = round((frame - 1) / ls_fps * video_fps)
    return max(0, min(index, frame_count - 1)) if frame_count else max(0, index)


def regions_from_context(result: Any) -> list[VideoRegion]:
    """``params.context.result`` → video regions; anything malformed is a 422 naming it.

    Label Studio sends every region of the label on that video, tracked ones included: only
    the regions to track (``VideoRegion.start``) count against ``TAPMASK_MAX_OBJECTS``.
    """
    if not isinstance(result, list) or not result:
        raise InvalidRequest("params.context.result must be a non-empty list of regions")
    regions = [parse_region(item, f"context.result[{i}]") for i, item in enumerate(result)]
    todo, limit = sum(r.start() is not None for r in regions), int(MAX_OBJECTS)
    if todo > limit:
        raise TooManyObjects(
            f"{todo} video regions to track in one request; at most {limit} (TAPMASK_MAX_OBJECTS)"
        )
    return regions


def parse_region(item: Any, where: str) -> VideoRegion:
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        raise InvalidRequest(f"{where} is not a region with a value")
    if item.get("type") != "videorectangle":
        raise InvalidRequest(
            f"{where} has type {short_repr(item.get('type'))}; video smart tools send "
            "videorectangle"
        )
    names = []
    for key in ("id", "from_name", "to_name"):
        value = item.get(key)
        if not isinstance(value, (str, int)) or not str(value) or len(str(value)) > 200:
            raise InvalidRequest(f"{where}.{key} must be a short string")
        names.append(str(value))
    value = item["value"]
    sequence = value.get("sequence")
    if not isinstance(sequence, list) or not sequence:
        raise InvalidRequest(f"{where}.value.sequence must be a non-empty list of keyframes")
    parsed = sorted(
        ((_keyframe(kf, f"{where}.value.sequence[{i}]"), kf) for i, kf in enumerate(sequence)),
        key=lambda pair: pair[0].frame,
    )
    return VideoRegion(
        names[0],
        names[1],
        names[2],
        tuple(k for k, _ in parsed),
        tuple(raw for _, raw in parsed),
        value,
    )


def _keyframe(item: Any, where: str) -> Keyframe:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} is not a keyframe object")
    frame = finite_number(item.get("frame"), f"{where}.frame", InvalidRequest)
    if frame < 1 or frame != int(frame) or frame > 10**9:
        raise InvalidRequest(f"{where}.frame must be a whole frame number from 1")
    numbers = [
        finite_number(item.get(key, 0.0), f"{where}.{key}", InvalidRequest)
        for key in ("x", "y", "width", "height", "rotation")
    ]
    if numbers[2] < 0 or numbers[3] < 0:
        raise InvalidRequest(f"{where}: width and height must not be negative")
    return Keyframe(int(frame), item.get("enabled", True) is not False, *numbers)


def frames_count(duration: float, ls_fps: float) -> int:
    """How many frames Label Studio counts in a video of ``duration`` seconds."""
    return max(1, round(duration * ls_fps))


def keyframe(frame: int, box: Box, width: int, height: int, ls_fps: float) -> dict[str, Any]:
    """A tracked frame as Label Studio's keyframe (percent of the frame; box corners
    inclusive, so its width is ``x2 - x1 + 1`` pixels)."""
    return {
        "frame": frame,
        "enabled": True,
        "rotation": 0,
        "x": round(box.x1 / width * 100, PERCENT_DIGITS),
        "y": round(box.y1 / height * 100, PERCENT_DIGITS),
        "width": round((box.x2 - box.x1 + 1) / width * 100, PERCENT_DIGITS),
        "height": round((box.y2 - box.y1 + 1) / height * 100, PERCENT_DIGITS),
        "time": frame / ls_fps,
    }


def region_result(
    region: VideoRegion,
    sequence: list[dict[str, Any]],
    *,
    frames_count: int,
    duration: float,
    score: float,
) -> dict[str, Any]:
    """The region Label Studio gets back: same id (the editor replaces the annotator's region
    with it), the annotator's keyframes up to the tracking start, then the tracked ones."""
    value: dict[str, Any] = {
        "framesCount": frames_count,
        "duration": duration,
        "sequence": sequence,
    }
    if region.labels is not None:
        value["labels"] = region.labels
    return {
        "id": region.id,
        "from_name": region.from_name,
        "to_name": region.to_name,
        "type": "videorectangle",
        "origin": "manual",
        "value": value,
        "score": round(score, 4),
    }
