"""Settings read from the environment, each in one place (stdlib only).

Every front end and worker reads the same names, so a container or a nuclio ``spec.env`` sets a
value once. The model a front end serves is ``TAPMASK_MODEL`` (``MODEL``, the Makefile's
variable, is accepted as a fallback).

**Limits.** Everything a request controls (its size, counts, nesting, the image it points to and
how long fetching that image may take) is bounded before work starts, each bound by one
:class:`Limit` below. ``LIMITS`` lists them all: README's "Limits" table is written from it (a test
checks that it lists every one). Values are read from the environment on each use, so a test or
a nuclio ``spec.env`` can set them; :func:`check_limits` refuses unusable values at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL = "grabcut"
#: The video tracker used when none is named: weights-free, CPU (``backends.models.flow_tracker``).
DEFAULT_TRACKER = "flow"


def model_name(default: str = DEFAULT_MODEL) -> str:
    """``$TAPMASK_MODEL``, else ``$MODEL``, else ``default``."""
    for name in ("TAPMASK_MODEL", "MODEL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return default


# --------------------------------------------------------------------------------------------
# Limits


@dataclass(frozen=True)
class Limit:
    """One bound on what a request may ask for: its variable, default and what it bounds."""

    env: str
    default: int | float
    unit: str
    bounds: str
    applies_to: str  # "Label Studio", "CVAT", "worker", "all", or several joined by ", "
    answer: str  # what a request over the bound gets

    @property
    def integer(self) -> bool:
        return isinstance(self.default, int)

    @property
    def default_text(self) -> str:
        """``256 MiB``, ``50000000 pixels``: the default as README's table writes it."""
        value = self.default
        number = str(int(value)) if float(value).is_integer() else str(value)
        return f"{number} {self.unit}"

    def value(self) -> int | float:
        """The bound in force: ``$env`` if set, else the default. ``ValueError`` if unusable."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            value: int | float = int(raw) if self.integer else float(raw)
        except ValueError:
            kind = "an integer" if self.integer else "a number"
            raise ValueError(f"{self.env}={raw!r}: expected {kind} ({self.unit})") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{self.env}={raw!r}: expected a positive finite {self.unit}")
        return value

    def __int__(self) -> int:
        return int(self.value())

    def __float__(self) -> float:
        return float(self.value())


#: Every limit by variable name, in the order README's "Limits" table lists them.
LIMITS: dict[str, Limit] = {}


def _limit(
    env: str, default: int | float, unit: str, bounds: str, applies_to: str, answer: str
) -> Limit:
    limit = Limit(env, default, unit, bounds, applies_to, answer)
    LIMITS[env] = limit
    return limit


MAX_REQUEST_MB = _limit(
    "TAPMASK_MAX_REQUEST_MB",
    256.0,
    "MiB",
    "a request body; Label Studio sends every annotation and prediction of a task along",
    "Label Studio, CVAT",
    "413 `request_too_large`",
)
MAX_JSON_DEPTH = _limit(
    "TAPMASK_MAX_JSON_DEPTH",
    64,
    "levels",
    "nesting of arrays and objects in a request body (Label Studio's nest about 10 deep)",
    "Label Studio, CVAT",
    "413 `json_too_deep`",
)
MAX_NUMBER_DIGITS = _limit(
    "TAPMASK_MAX_NUMBER_DIGITS",
    100,
    "digits",
    "digits in one number of a request body (Python refuses over 4300, slowly)",
    "Label Studio, CVAT",
    "413 `number_too_long`",
)
MAX_OBJECTS = _limit(
    "TAPMASK_MAX_OBJECTS",
    32,
    "objects",
    "objects (one model run each) in one request: smart rectangles, plus one for keypoints, or "
    "video regions to track",
    "Label Studio",
    "413 `too_many_objects`",
)
MAX_CLICKS = _limit(
    "TAPMASK_MAX_CLICKS",
    100,
    "clicks",
    "clicks on one object (keypoints; CVAT pos_points + neg_points; a worker job's clicks)",
    "all",
    "413 `too_many_clicks`",
)
MAX_PIXELS = _limit(
    "TAPMASK_MAX_PIXELS",
    50_000_000,
    "pixels",
    "an image (read from its header, before decoding) and a declared original_width × "
    "original_height",
    "all",
    "413 `image_too_large` / `declared_size_too_large`",
)
MAX_IMAGE_MB = _limit(
    "TAPMASK_MAX_IMAGE_MB",
    100.0,
    "MiB",
    "an image file: a download, a data: URI, CVAT's base64 image, a worker's image from Redis",
    "all",
    "413 `image_too_large`",
)
MAX_URL_CHARS = _limit(
    "TAPMASK_MAX_URL_CHARS",
    8192,
    "characters",
    "a task's image URL (data: URIs are bounded by TAPMASK_MAX_IMAGE_MB instead)",
    "Label Studio",
    "414 `image_url_too_long`",
)
DOWNLOAD_READ_TIMEOUT_S = _limit(
    "TAPMASK_DOWNLOAD_READ_TIMEOUT_S",
    10.0,
    "seconds",
    "silence while connecting to the image host or between two reads of its answer",
    "Label Studio",
    "504 `image_timeout`",
)
DOWNLOAD_DEADLINE_S = _limit(
    "TAPMASK_DOWNLOAD_DEADLINE_S",
    30.0,
    "seconds",
    "one image download from start to last byte (name lookup included)",
    "Label Studio",
    "504 `image_timeout`",
)
MAX_VIDEO_MB = _limit(
    "TAPMASK_MAX_VIDEO_MB",
    500.0,
    "MiB",
    "a task's video file (a download or a data: URI), before any frame is decoded",
    "Label Studio",
    "413 `video_too_large`",
)
VIDEO_DOWNLOAD_DEADLINE_S = _limit(
    "TAPMASK_VIDEO_DOWNLOAD_DEADLINE_S",
    120.0,
    "seconds",
    "one video download from start to last byte (TAPMASK_DOWNLOAD_READ_TIMEOUT_S still bounds "
    "silence)",
    "Label Studio",
    "504 `image_timeout`",
)
MAX_VIDEO_PIXELS = _limit(
    "TAPMASK_MAX_VIDEO_PIXELS",
    8_294_400,
    "pixels",
    "a video frame (width × height from the container, before decoding; 3840×2160 by default)",
    "Label Studio",
    "413 `video_too_large`",
)
MAX_TRACK_FRAMES = _limit(
    "TAPMASK_MAX_TRACK_FRAMES",
    500,
    "frames",
    "frames one object is followed through in one request (TAPMASK_VIDEO_TRACK_SECONDS × the "
    "video's framerate) or one `tapmask track` object",
    "Label Studio",
    "tracking stops there (logged)",
)
PREFETCH_QUEUE = _limit(
    "TAPMASK_PREFETCH_QUEUE",
    256,
    "images",
    "task-open prefetches waiting to run; further tasks are not prefetched (logged)",
    "Label Studio",
    "not prefetched (logged)",
)
MAX_TRACKED_OBJECTS = _limit(
    "TAPMASK_MAX_TRACKED_OBJECTS",
    32,
    "objects",
    "objects tracked in one video-frame request (CVAT tracker shapes; a worker's track job)",
    "all",
    "413 `too_many_objects`",
)
MAX_SHAPE_POINTS = _limit(
    "TAPMASK_MAX_SHAPE_POINTS",
    10000,
    "points",
    "vertices of one polygon a tool sends to track (CVAT polygon shapes; a worker's track job)",
    "all",
    "413 `too_many_points`",
)
MAX_TRACK_STATE_MB = _limit(
    "TAPMASK_MAX_TRACK_STATE_MB",
    64.0,
    "MiB",
    "one tracked object's state in the shared Redis tier (SAM 2 memory bank, fp16); a larger "
    "state stays in its worker's memory only",
    "worker",
    "not shared (the next frame on another worker re-initialises)",
)

MAX_REFINE_REGIONS = _limit(
    "TAPMASK_MAX_REFINE_REGIONS",
    32,
    "regions",
    "brush and polygon regions of the clicked label in a task's drafts, annotations and "
    "predictions that a click may refine (each is decoded to find the nearest)",
    "Label Studio",
    "the rest are not considered (logged)",
)


MAX_INSTANCES = _limit(
    "TAPMASK_MAX_INSTANCES",
    100,
    "instances",
    "masks made for one image by pre-annotation: detections kept (highest scores first), or "
    "the rectangles of one task turned into masks",
    "pre-annotation",
    "detections: the highest-scoring kept (logged); rectangles: 413 `too_many_instances`",
)
MAX_TEXT_PROMPTS = _limit(
    "TAPMASK_MAX_TEXT_PROMPTS",
    32,
    "prompts",
    "text prompts (phrases, `car . truck` is two) sent to the detector for one image",
    "pre-annotation",
    "413 `too_many_text_prompts`",
)
MAX_TEXT_PROMPT_CHARS = _limit(
    "TAPMASK_MAX_TEXT_PROMPT_CHARS",
    1024,
    "characters",
    "the detector's whole text for one image (every phrase joined by ` . `); Grounding DINO "
    "also refuses more than its 256 text tokens",
    "pre-annotation",
    "413 `text_prompt_too_long`",
)
RETRIEVE_BUDGET_S = _limit(
    "TAPMASK_RETRIEVE_BUDGET_S",
    80.0,
    "seconds",
    'one Label Studio "Retrieve predictions" call answered with masks (Label Studio waits '
    "100 s); tasks not done by then get no prediction",
    "Label Studio",
    "unfinished tasks skipped (logged)",
)


def check_limits() -> None:
    """Read every limit once: a front end or worker calls this at start-up, so an unusable
    value (``TAPMASK_MAX_OBJECTS=lots``) stops it there instead of failing each request."""
    for limit in LIMITS.values():
        limit.value()


def max_bytes(limit: Limit) -> int:
    """A MiB limit in bytes."""
    return int(float(limit) * 2**20)
