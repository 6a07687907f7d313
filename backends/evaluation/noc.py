"""The NoC (number of clicks) loop: simulate an annotator until the mask is good enough.

Beside NoC, ``summarise`` reports what an annotator feels click by click: the *collapse rate*
(the share of follow-up clicks that lower IoU by more than ``COLLAPSE_DROP``, "I clicked to fix
the tail and the whole dog vanished") and the mean IoU after 1, 3 and 5 clicks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from backends.errors import EmptyMask
from backends.evaluation.clicker import as_click, iou, next_click
from backends.prompts import Click, Prompt, Segmentation

SegmentFn = Callable[[bytes, Prompt], Segmentation]

log = logging.getLogger(__name__)

COLLAPSE_DROP = 0.2
MIOU_AFTER = (1, 3, 5)


@dataclass
class SampleResult:
    name: str
    ious: list[float] = field(default_factory=list)  # IoU after click 1, 2, …
    seconds: list[float] = field(default_factory=list)  # time of each click
    error: str | None = None  # why this sample could not be evaluated (it then has no IoUs)

    def noc(self, threshold: float, max_clicks: int) -> int:
        """Clicks needed to reach ``threshold`` (``max_clicks`` when never reached)."""
        for index, value in enumerate(self.ious[:max_clicks]):
            if value >= threshold:
                return index + 1
        return max_clicks

    def collapses(self, drop: float = COLLAPSE_DROP) -> int:
        """Follow-up clicks after which IoU fell by more than ``drop``."""
        return sum(1 for a, b in pairwise(self.ious) if a - b > drop)

    def iou_after(self, clicks: int) -> float:
        """IoU after ``clicks`` clicks; a run stopped earlier keeps its last IoU."""
        return self.ious[min(clicks, len(self.ious)) - 1]


def evaluate_sample(
    segment: SegmentFn,
    name: str,
    image_bytes: bytes,
    gt: np.ndarray,
    *,
    max_clicks: int = 20,
    stop_iou: float | None = None,
) -> SampleResult:
    """Click, segment, measure, repeat. ``stop_iou`` ends early once reached (None: all clicks).

    A click that raises ends this sample: the result keeps the IoUs so far and the error, so a
    whole-dataset run reports the sample and goes on with the next one.
    """
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
        except Exception as exc:  # reported per sample; the run goes on
            log.warning("%s: click %d failed", name, len(clicks), exc_info=True)
            result.error = f"click {len(clicks)}: {type(exc).__name__}: {exc}"
            return result
        result.seconds.append(time.perf_counter() - started)
        result.ious.append(iou(gt, pred))
        if stop_iou is not None and result.ious[-1] >= stop_iou:
            break
    return result


def summarise(results: list[SampleResult], max_clicks: int) -> dict[str, float]:
    """NoC@80/85/90, how many samples need max_clicks or more at 85/90, collapse rate (% of
    follow-up clicks), mean IoU after 1/3/5 clicks, seconds per click, failed samples.

    Failed samples (``error`` set) are counted in ``failed`` and left out of every other figure.
    """
    failed = sum(1 for r in results if r.error is not None)
    results = [r for r in results if r.error is None and r.ious]
    summary: dict[str, float] = {}
    for threshold in (0.80, 0.85, 0.90):
        nocs = [r.noc(threshold, max_clicks) for r in results]
        summary[f"NoC@{round(threshold * 100)}"] = float(np.mean(nocs)) if nocs else float("nan")
    for threshold in (0.85, 0.90):
        over = sum(1 for r in results if r.noc(threshold, max_clicks) >= max_clicks)
        summary[f">={max_clicks}@{round(threshold * 100)}"] = float(over)
    follow_ups = sum(len(r.ious) - 1 for r in results)
    collapses = sum(r.collapses() for r in results)
    summary["collapse%"] = 100.0 * collapses / follow_ups if follow_ups else float("nan")
    for clicks in MIOU_AFTER:
        values = [r.iou_after(clicks) for r in results]
        summary[f"mIoU@{clicks}"] = float(np.mean(values)) if values else float("nan")
    seconds = [s for r in results for s in r.seconds]
    summary["s/click"] = float(np.mean(seconds)) if seconds else float("nan")
    summary["failed"] = float(failed)
    return summary
