"""Tool-neutral request and result types: what a click means once a front end has parsed it.

Coordinates are image pixels (x = column, y = row) of the decoded, EXIF-rotated image. Pixel
centres sit at integer coordinates, so a click on the first pixel is (0, 0) and on the last one
(width - 1, height - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.errors import PromptError, TapmaskError, TooManyClicks, TooManyPoints
from backends.settings import MAX_CLICKS, MAX_SHAPE_POINTS

#: A click this far outside the image (in pixels or as a fraction of the image side, whichever
#: is larger) is clipped to the border; anything further is rejected as a wrong coordinate system.
CLIP_MARGIN_PX = 8.0
CLIP_MARGIN_FRACTION = 0.02


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut short for messages: a hostile value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def finite_number(value: Any, what: str, error: type[TapmaskError] = PromptError) -> float:
    """``value`` as a finite float, else ``error`` naming ``what``. Booleans are not numbers;
    an integer too large for a float counts as infinite (``float()`` would overflow)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise error(f"{what} must be a number, got {short_repr(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise error(f"{what} must be finite, got {short_repr(value)}")
    return number


def _finite(name: str, *values: float) -> None:
    for value in values:
        finite_number(value, f"{name}: coordinates")


def _clip(name: str, value: float, size: int) -> float:
    margin = max(CLIP_MARGIN_PX, CLIP_MARGIN_FRACTION * size)
    if value < -margin or value > size - 1 + margin:
        raise PromptError(
            f"{name}={value:g} is outside the image (0..{size - 1}); "
            "coordinates must be image pixels"
        )
    return float(min(max(value, 0.0), size - 1))


@dataclass(frozen=True)
class Click:
    """One click: positive adds the pixel to the object, negative removes it."""

    x: float
    y: float
    positive: bool = True

    def __post_init__(self) -> None:
        _finite("click", self.x, self.y)
        object.__setattr__(self, "x", float(self.x))
        object.__setattr__(self, "y", float(self.y))
        object.__setattr__(self, "positive", bool(self.positive))

    def key(self) -> tuple[float, float, bool]:
        """A hashable identity, rounded so float noise from percent conversions still matches."""
        return (round(self.x, 3), round(self.y, 3), self.positive)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels, corners inclusive: (x1, y1) top-left to (x2, y2)."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        _finite("box", self.x1, self.y1, self.x2, self.y2)
        for name in ("x1", "y1", "x2", "y2"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise PromptError(
                f"box is inverted: ({self.x1:g},{self.y1:g})-({self.x2:g},{self.y2:g}); "
                "expected x1 <= x2 and y1 <= y2"
            )

    def key(self) -> tuple[float, float, float, float]:
        return (round(self.x1, 3), round(self.y1, 3), round(self.x2, 3), round(self.y2, 3))

    def as_xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def clipped(self, width: int, height: int) -> Box:
        """The box clipped to a ``width`` × ``height`` image like a click (far outside:
        ``PromptError``)."""
        return Box(
            _clip("box x1", self.x1, width),
            _clip("box y1", self.y1, height),
            _clip("box x2", self.x2, width),
            _clip("box y2", self.y2, height),
        )


@dataclass(frozen=True, eq=False)
class Prompt:
    """Everything the annotator said about one object so far.

    Tools resend every click on each request; ``clicks`` is that full list in click order.
    ``previous_mask`` is an optional H×W mask the caller already has (e.g. an evaluation loop);
    the Engine's interaction-state cache normally makes it unnecessary.
    """

    clicks: tuple[Click, ...] = ()
    box: Box | None = None
    previous_mask: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clicks", tuple(self.clicks))
        if not self.clicks and self.box is None:
            raise PromptError("empty prompt: give at least one click or a box")
        if self.previous_mask is not None and np.asarray(self.previous_mask).ndim != 2:
            raise PromptError("previous_mask must be a 2-D H×W array")

    @property
    def positives(self) -> list[Click]:
        return [c for c in self.clicks if c.positive]

    @property
    def negatives(self) -> list[Click]:
        return [c for c in self.clicks if not c.positive]

    def validated(self, width: int, height: int) -> Prompt:
        """Check the prompt against an image size: clip near-misses, reject far-outside input."""
        clicks = tuple(
            Click(_clip("click x", c.x, width), _clip("click y", c.y, height), c.positive)
            for c in self.clicks
        )
        box = self.box
        if box is not None:
            box = box.clipped(width, height)
        if self.previous_mask is not None and np.asarray(self.previous_mask).shape != (
            height,
            width,
        ):
            raise PromptError(
                f"previous_mask has shape {np.asarray(self.previous_mask).shape}, "
                f"image is {height}×{width}"
            )
        return Prompt(clicks, box, self.previous_mask)

    def prefix(self, n: int) -> Prompt:
        """The prompt after its first ``n`` clicks (a box, if any, always comes first)."""
        return Prompt(self.clicks[:n], self.box)

    def key(self) -> tuple[Any, ...]:
        """Hashable identity of the clicks and box (not the previous mask)."""
        return (self.box.key() if self.box else None, tuple(c.key() for c in self.clicks))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (no previous mask): what crosses a queue."""
        return {
            "clicks": [[c.x, c.y, c.positive] for c in self.clicks],
            "box": list(self.box.as_xyxy()) if self.box else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prompt:
        try:
            clicks = tuple(Click(float(x), float(y), bool(p)) for x, y, p in data.get("clicks", []))
            box_values = data.get("box")
            box = Box(*(float(v) for v in box_values)) if box_values else None
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, PromptError):
                raise
            raise PromptError(f"malformed prompt: {str(exc)[:200]}") from exc
        return cls(clicks, box)


@dataclass(eq=False)
class Segmentation:
    """A model's answer for one object: a full-image boolean mask and a confidence score."""

    mask: np.ndarray
    score: float
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be H×W, got shape {self.mask.shape}")
        self.score = float(self.score)

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def area(self) -> int:
        return int(self.mask.sum())


# --------------------------------------------------------------------------------------------
# Tracking (video): what a tool sends for one object on one frame, and what it gets back

#: Characters a tracking handle may hold (``secrets.token_urlsafe``'s alphabet) and its length
#: bounds; anything else is a forged handle and re-initialises from the shape.
TRACK_HANDLE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
TRACK_HANDLE_MAX_CHARS = 64


def valid_handle(value: Any) -> bool:
    """Whether ``value`` looks like a handle tapmask issued (a string of 16–64 URL-safe
    characters). Handles come back from browsers and tools: untrusted until checked here."""
    return (
        isinstance(value, str)
        and 16 <= len(value) <= TRACK_HANDLE_MAX_CHARS
        and set(value) <= TRACK_HANDLE_CHARS
    )


@dataclass(frozen=True, eq=False)
class TrackTarget:
    """One tracked object on one frame, as a tool sends it.

    The shape (exactly one of ``box``, ``polygon``, ``mask``; a polygon is ≥ 3 (x, y) image
    pixels, a mask H×W; or ``clicks``, alone or with a box, as an interactive model takes them)
    is where the tool believes the object is now: it initialises the
    tracker when ``state`` is None, and again whenever ``state`` cannot be used (expired,
    unknown, from another tracker or another image size, forged). ``state`` is the opaque
    handle from the previous answer for this object; it travels through browsers and tools and
    is *untrusted*: a malformed one is treated as absent (logged), never an error.
    """

    box: Box | None = None
    polygon: tuple[tuple[float, float], ...] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    state: str | None = None
    clicks: tuple[Click, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "clicks", tuple(self.clicks))
        given = [s for s in (self.box, self.polygon, self.mask) if s is not None]
        if self.clicks:
            if self.polygon is not None or self.mask is not None:
                raise PromptError("clicks go with a box or alone, not with a polygon or a mask")
            limit = int(MAX_CLICKS)
            if len(self.clicks) > limit:
                raise TooManyClicks(
                    f"{len(self.clicks)} clicks on a tracked object; at most {limit} "
                    "(TAPMASK_MAX_CLICKS)"
                )
            if not any(c.positive for c in self.clicks) and self.box is None:
                raise PromptError("clicks without a box need at least one positive click")
        elif len(given) != 1:
            raise PromptError(
                "a tracked object needs exactly one shape: a box, a polygon, a mask or clicks"
            )
        if self.polygon is not None:
            limit = int(MAX_SHAPE_POINTS)
            if len(self.polygon) > limit:
                raise TooManyPoints(
                    f"a polygon has {len(self.polygon)} points; at most {limit} "
                    "(TAPMASK_MAX_SHAPE_POINTS)"
                )
            points = tuple(
                (finite_number(p[0], "polygon x"), finite_number(p[1], "polygon y"))
                if isinstance(p, (tuple, list)) and len(p) == 2
                else _bad_point(p)
                for p in self.polygon
            )
            if len(points) < 3:
                raise PromptError(f"a polygon needs at least 3 points, got {len(points)}")
            object.__setattr__(self, "polygon", points)
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise PromptError("a tracked object's mask must be a 2-D H×W array")
            object.__setattr__(self, "mask", mask.astype(bool, copy=False))

    @property
    def kind(self) -> str:
        """``box``, ``polygon``, ``mask`` or ``clicks`` (clicks with or without a box): which
        shape the tool sent (answers keep it)."""
        if self.clicks:
            return "clicks"
        return "box" if self.box is not None else "polygon" if self.polygon is not None else "mask"

    @property
    def prompt(self) -> Prompt:
        """The box and clicks as an interactive ``Prompt`` (``PromptError`` for a polygon or a
        mask, which are not prompts)."""
        if self.box is None and not self.clicks:
            raise PromptError(f"a {self.kind} is not a click prompt")
        return Prompt(self.clicks, self.box)

    def validated(self, width: int, height: int) -> TrackTarget:
        """The target checked against a frame size: coordinates clipped like clicks (far
        outside: ``PromptError``), a mask of another size refused."""
        box, polygon = self.box, self.polygon
        if box is not None:
            box = box.clipped(width, height)
        if polygon is not None:
            polygon = tuple(
                (_clip("polygon x", x, width), _clip("polygon y", y, height)) for x, y in polygon
            )
        if self.mask is not None and self.mask.shape != (height, width):
            raise PromptError(
                f"the mask has shape {self.mask.shape}, the frame is {height}×{width}"
            )
        clicks = tuple(
            Click(_clip("click x", c.x, width), _clip("click y", c.y, height), c.positive)
            for c in self.clicks
        )
        return TrackTarget(box, polygon, self.mask, self.state, clicks)

    def shape_mask(self, width: int, height: int) -> np.ndarray:
        """The shape as an H×W boolean mask (a box filled, a polygon rasterised). Clicks
        alone have no shape (``PromptError``): a tracker segments them."""
        if self.mask is not None:
            return self.mask
        if self.box is None and self.polygon is None:
            raise PromptError("clicks alone have no shape to rasterise")
        from backends.masks import polygons_to_mask

        if self.box is not None:
            b = self.box
            points = [(b.x1, b.y1), (b.x2, b.y1), (b.x2, b.y2), (b.x1, b.y2)]
        else:
            points = list(self.polygon or ())
        return polygons_to_mask([np.asarray(points, dtype=np.float64)], height, width)

    def shape_box(self, width: int, height: int) -> Box | None:
        """The shape's bounding box (None for an empty mask)."""
        if self.box is not None:
            return self.box
        if self.clicks:
            xs = [c.x for c in self.clicks if c.positive]
            ys = [c.y for c in self.clicks if c.positive]
            return Box(min(xs), min(ys), max(xs), max(ys))
        if self.polygon is not None:
            xs = [p[0] for p in self.polygon]
            ys = [p[1] for p in self.polygon]
            return Box(min(xs), min(ys), max(xs), max(ys))
        from backends.masks import mask_bbox

        bbox = mask_bbox(self.shape_mask(width, height))
        return Box(*bbox) if bbox is not None else None


def _bad_point(point: Any) -> tuple[float, float]:
    raise PromptError(f"polygon points must be [x, y] pairs, got {short_repr(point)}")


@dataclass(eq=False)
class TrackAnswer:
    """A tracker's answer for one target on one frame (aligned with the targets sent).

    ``state`` is a fresh handle for the next frame (every answer gets its own, so a tool that
    steps back a frame and tracks again continues from the state it holds, not from a later
    one). ``mask`` is H×W bool, all False when ``lost``; ``box`` its bounding box (None when
    lost); ``score`` the tracker's confidence in [0, 1].
    """

    state: str
    mask: np.ndarray = field(repr=False)
    box: Box | None
    score: float
    lost: bool

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be H×W, got shape {self.mask.shape}")
        self.score = float(self.score)
        self.lost = bool(self.lost)
