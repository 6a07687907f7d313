"""The NoC (number of clicks) loop: simulate an annotator until the mask is good enough."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backends.errors import EmptyMask
from backends.evaluation.clicker import as_click, iou, next_click
from backends.prompts import Click, Prompt, Segmentation

SegmentFn = Callable[[bytes, Prompt], Segmentation]


@dataclass
class SampleResult:
    name: str
    ious: list[float] = field(default_factory=list)  # IoU after click 1, 2, …
    seconds: list[float] = field(default_factory=list)  # time of each click

    def noc(self, threshold: float, max_clicks: int) -> int:
        """Clicks needed to reach ``threshold`` (``max_clicks`` when never reached)."""
        for index, value in enumerate(self.ious[:max_clicks]):
            if value >= threshold:
                return index + 1
        return max_clicks


def evaluate_sample(
    segment: SegmentFn,
    name: str,
    image_bytes: bytes,
    gt: np.ndarray,
    *,
    max_clicks: int = 20,
    stop_iou: float | None = None,
) -> SampleResult:
    """Click, segment, measure, repeat. ``stop_iou`` ends early once reached (None: all clicks)."""
    result = SampleResult(name)
    pred = np.zeros(gt.shape, dtype=bool)
    clicks: list[Click] = []
    clicked: list[tuple[int, int]] = []
    for _ in range(max_clicks):
        row, col, positive = next_click(gt, pred, clicked)
        clicked.append((row, col))
        clicks.append(as_click(row, col, positive))
        started = time.perf_counter()
        try:
            pred = segment(image_bytes, Prompt(tuple(clicks))).mask
        except EmptyMask:
            pred = np.zeros(gt.shape, dtype=bool)
        result.seconds.append(time.perf_counter() - started)
        result.ious.append(iou(gt, pred))
        if stop_iou is not None and result.ious[-1] >= stop_iou:
            break
    return result


def summarise(results: list[SampleResult], max_clicks: int) -> dict[str, float]:
    """NoC@80/85/90, how many samples need max_clicks or more at 85/90, seconds per click."""
    summary: dict[str, float] = {}
    for threshold in (0.80, 0.85, 0.90):
        nocs = [r.noc(threshold, max_clicks) for r in results]
        summary[f"NoC@{round(threshold * 100)}"] = float(np.mean(nocs)) if nocs else float("nan")
    for threshold in (0.85, 0.90):
        over = sum(1 for r in results if r.noc(threshold, max_clicks) >= max_clicks)
        summary[f">={max_clicks}@{round(threshold * 100)}"] = float(over)
    seconds = [s for r in results for s in r.seconds]
    summary["s/click"] = float(np.mean(seconds)) if seconds else float("nan")
    return summary
