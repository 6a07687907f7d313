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

from backends.errors import PromptError, TapmaskError

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
            box = Box(
                _clip("box x1", box.x1, width),
                _clip("box y1", box.y1, height),
                _clip("box x2", box.x2, width),
                _clip("box y2", box.y2, height),
            )
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
