"""`tapmask bench` rows. Each module here exposes ``run() -> list[BenchRow]``.

Every row measures ours and a baseline side by side in the same run, so the ratio is meaningful
on a noisy machine even when the absolute times are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class BenchRow:
    name: str
    ours: float  # measured value for tapmask (seconds unless ``unit`` says otherwise)
    baseline: float  # the same quantity for the thing we compare against
    unit: str = "s"
    target: str = ""  # e.g. ">= 20x faster"
    passed: bool | None = None  # whether the target holds, None when there is no target
    note: str = ""
    higher_is_better: bool = False  # throughput rows: the ratio is ours / baseline
    show_ratio: bool = True  # False where the row compares a difference, not a ratio

    @property
    def ratio(self) -> float:
        """How many times better ours is than the baseline."""
        better, worse = (
            (self.ours, self.baseline) if self.higher_is_better else (self.baseline, self.ours)
        )
        return better / worse if worse else float("inf")


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
