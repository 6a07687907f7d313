"""Label Studio's "Retrieve predictions" answered with masks, for projects that opt in.

Label Studio 1.23.2's Data Manager action ``retrieve_tasks_predictions`` sends every selected task
(with its annotations and predictions) in ONE ``/predict`` call without context and waits 100 s
(``ML_TIMEOUT_PREDICT``) for ``{"results": [...]}``, one entry per task in order: a dict with
``result`` becomes a prediction, an empty list none (``ml/models.py``,
``_get_predictions_from_ml_backend``). Past its timeout it stores nothing at all, which is why big
selections fail there (Label Studio issues #6330, #6422, #9098).

So a project that opts in (``TAPMASK_RETRIEVE=text|boxes`` for every project, or the ML
backend's *extra params* ``{"retrieve": "text"|"boxes", "prompts": {"Car": "car . truck"},
"format": "brush"|"polygon"|"both"}`` for one) gets the same predictions as ``tapmask annotate``
(same ``model_version``), computed ``concurrency`` tasks at a time within
``TAPMASK_RETRIEVE_BUDGET_S`` (default 80 s): tasks not finished by then get no prediction this
time (logged; retrieving again continues with them: a task that already holds this model
version's prediction is answered with none, never twice). Without opt-in: prefetch only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from backends.dispatch import Dispatcher
from backends.errors import InvalidRequest
from backends.labelstudio.labelconfig import LabelConfig
from backends.labelstudio.preannotation import FORMATS, MODES, Preannotation, task_prediction
from backends.preannotate import thresholds_from_env
from backends.settings import RETRIEVE_BUDGET_S

log = logging.getLogger("tapmask.labelstudio")


def check_extra_params(extra: Any) -> dict[str, Any]:
    """A project's ML backend extra params, as ``/setup`` pushes them: the retrieve keys checked
    (422 at ``/setup``, so the mistake shows when the backend is connected), others ignored."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise InvalidRequest("/setup: extra_params must be a JSON object")
    retrieve, prompts, fmt = extra.get("retrieve"), extra.get("prompts"), extra.get("format")
    if retrieve is not None and retrieve not in MODES:
        raise InvalidRequest(f"/setup: extra_params.retrieve must be one of {MODES}")
    if prompts is not None and not (
        isinstance(prompts, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
    ):
        raise InvalidRequest('/setup: extra_params.prompts must be {"Label": "prompt text"}')
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest(f"/setup: extra_params.format must be one of {sorted(FORMATS)}")
    return {k: v for k, v in (("retrieve", retrieve), ("prompts", prompts), ("format", fmt)) if v}


def retrieve_plan(
    mode: str | None, extra: Mapping[str, Any], model: str, detector: str, fmt: str
) -> Preannotation | None:
    """The project's pre-annotation, or None when it has not opted in."""
    mode = extra.get("retrieve") or mode
    if not mode:
        return None
    return Preannotation(
        mode,
        model,
        detector if mode == "text" else None,
        prompts=extra.get("prompts") or {},
        thresholds=thresholds_from_env(),
        formats=FORMATS[extra.get("format") or fmt],
    )


class Retriever:
    """Pre-annotates the tasks of one ``/predict`` call within the time budget."""

    def __init__(self, dispatcher: Dispatcher, concurrency: int = 2) -> None:
        self.dispatcher = dispatcher
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="ls-retrieve")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def results(
        self,
        plan: Preannotation,
        config: LabelConfig,
        tasks: list[dict[str, Any]],
        fetch: Callable[[str], bytes],
    ) -> list[Any]:
        """One entry per task, in order: its prediction, or ``[]`` (none) for a task that already
        holds this version's, failed, or did not finish within ``TAPMASK_RETRIEVE_BUDGET_S``."""
        budget = float(RETRIEVE_BUDGET_S)
        deadline = time.monotonic() + budget
        version = plan.model_version(config)
        futures: list[Future[dict[str, Any]] | None] = []
        for task in tasks:
            held = any(
                isinstance(p, dict) and p.get("model_version") == version
                for p in task.get("predictions") or []
            )
            futures.append(
                None
                if held
                else self._executor.submit(
                    task_prediction, self.dispatcher, plan, config, task, fetch
                )
            )
        pending = [f for f in futures if f is not None]
        wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        answers: list[Any] = []
        late = 0
        for task, future in zip(tasks, futures, strict=True):
            if future is None:
                answers.append([])
            elif not future.done():
                future.cancel()
                late += 1
                answers.append([])
            elif future.exception() is not None:
                log.warning("task %s: not pre-annotated: %s", task.get("id"), future.exception())
                answers.append([])
            else:
                answers.append(future.result())
        if late:
            log.warning(
                "%d of %d task(s) not pre-annotated within %g s (TAPMASK_RETRIEVE_BUDGET_S): "
                "retrieve predictions again, or run `tapmask annotate`, for the rest",
                late,
                len(tasks),
                budget,
            )
        return answers
