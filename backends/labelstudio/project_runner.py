"""Running one function over every task of a project: bounded, visible, resumable, never aborted.

``run_tasks(tasks, work, …)`` is what whole-project commands share (``tapmask annotate``; a video
``tapmask track --project`` can pass its own ``work``):

* at most ``concurrency`` tasks run at once (threads: the work is I/O and model calls, which the
  dispatcher serialises per model or spreads over the worker pool), and at most twice that many
  are taken from ``tasks`` ahead, so a project of 100 000 tasks is never all in memory;
* a tqdm progress bar shows tasks done, the rate and the ETA, with done / skipped / failed counts;
* ``work(task)`` returns ``DONE`` or ``SKIPPED`` (resumability is the work's business: a task
  that already holds this run's result is skipped, so a killed run simply starts again);
* an exception in one task is logged with the task's id and counted, and the run goes on;
  Ctrl+C stops taking tasks, lets the running ones finish and still prints the summary;
* the ``Summary`` lists what happened, failed tasks with their reasons.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from backends.errors import TapmaskError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Outcome(enum.Enum):
    DONE = "done"
    SKIPPED = "skipped"


@dataclass
class Summary:
    """What a run did; ``failed`` holds ``(task id, reason)`` pairs."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Any, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def total(self) -> int:
        return self.done + self.skipped + len(self.failed)

    @property
    def exit_code(self) -> int:
        """0 when every task was done or skipped; 1 when any failed or the run was stopped."""
        return 1 if self.failed or self.interrupted else 0

    def report(self, what: str = "tasks") -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.total} {what}: {self.done} done, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed in {self.seconds:.1f} s ({rate:.2f} done/s)"
            + (" — interrupted" if self.interrupted else "")
        ]
        lines += [f"  task {task}: {reason}" for task, reason in self.failed]
        return "\n".join(lines)


def run_tasks(
    tasks: Iterable[T],
    work: Callable[[T], Outcome],
    *,
    concurrency: int = 4,
    total: int | None = None,
    task_id: Callable[[T], Any] = lambda task: task["id"],  # type: ignore[index]
    desc: str = "tasks",
    progress: bool = True,
) -> Summary:
    """Run ``work`` over ``tasks`` (see the module docstring); returns the ``Summary``."""
    concurrency = max(1, int(concurrency))
    summary = Summary()
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="task", disable=not progress, dynamic_ncols=True)
    pending: dict[Future[Outcome], Any] = {}

    def settle(done: set[Future[Outcome]]) -> None:
        for future in done:
            ident = pending.pop(future)
            try:
                outcome = future.result()
            except Exception as exc:  # one task's failure never ends the run
                known = isinstance(exc, TapmaskError) and str(exc)
                reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
                summary.failed.append((ident, reason[:500]))
                log.warning("task %s failed: %s", ident, reason[:500])
            else:
                if outcome is Outcome.SKIPPED:
                    summary.skipped += 1
                else:
                    summary.done += 1
            bar.update(1)
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=len(summary.failed))

    executor = ThreadPoolExecutor(concurrency, thread_name_prefix="project-task")
    try:
        for task in tasks:
            while len(pending) >= 2 * concurrency:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                settle(finished)
            pending[executor.submit(work, task)] = task_id(task)
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            settle(finished)
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: finishing the %d running task(s)", len(pending))
        for future in pending:
            future.cancel()
        finished, _ = wait(pending)
        settle({f for f in finished if not f.cancelled()})
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
