"""The whole-project runner (``backends.labelstudio.project_runner``): bounded, never aborted by
one task, resumable through its work function, with a summary that names every failure."""

from __future__ import annotations

import threading
import time

import pytest

from backends.errors import ImageNotFound
from backends.labelstudio.project_runner import Outcome, run_tasks


def test_failures_are_reported_and_the_run_goes_on():
    def work(task: dict) -> Outcome:
        if task["id"] == 3:
            raise ImageNotFound("image not found (404): /data/upload/gone.jpg")
        if task["id"] == 5:
            raise ValueError("a bug")
        return Outcome.SKIPPED if task["id"] % 2 == 0 else Outcome.DONE

    summary = run_tasks(({"id": i} for i in range(1, 9)), work, concurrency=3, progress=False)
    assert (summary.done, summary.skipped, summary.total) == (2, 4, 8)
    assert sorted(summary.failed) == [
        (3, "image not found (404): /data/upload/gone.jpg"),
        (5, "ValueError: a bug"),
    ]
    assert summary.exit_code == 1
    report = summary.report()
    assert "8 tasks: 2 done, 4 skipped (already done), 2 failed" in report
    assert "task 3: image not found" in report and "task 5: ValueError: a bug" in report


def test_at_most_concurrency_tasks_run_and_few_are_taken_ahead():
    running, peak, taken = 0, 0, []
    lock = threading.Lock()

    def tasks():
        for i in range(20):
            taken.append(i)
            yield {"id": i}

    def work(task: dict) -> Outcome:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            assert len(taken) - task["id"] <= 2 * 2 + 1  # the window ahead stays bounded
        time.sleep(0.02)
        with lock:
            running -= 1
        return Outcome.DONE

    summary = run_tasks(tasks(), work, concurrency=2, total=20, progress=False)
    assert summary.done == 20 and summary.exit_code == 0
    assert peak == 2


@pytest.mark.parametrize("concurrency", [0, 1])
def test_one_task_at_a_time_in_order(concurrency):
    seen = []
    run_tasks(
        ({"id": i} for i in range(5)),
        lambda task: seen.append(task["id"]) or Outcome.DONE,
        concurrency=concurrency,
        progress=False,
    )
    assert seen == list(range(5))
