"""``tapmask annotate --project N``: pre-annotate a whole Label Studio project through its API.

Each task (``project_runner.run_tasks``: bounded concurrency, progress, one failure never fatal)
is read in full, skipped when it already holds a prediction of this run's ``model_version``
(``--force`` redoes it: the new prediction is posted first, then the old ones are deleted, so a
failure never loses one), else pre-annotated (``preannotation.task_prediction``) and posted as one
prediction. A run killed midway is simply started again: what was posted is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.dispatch import Dispatcher
from backends.labelstudio.api import LabelStudioApi
from backends.labelstudio.labelconfig import LabelConfig
from backends.labelstudio.preannotation import Preannotation, check_config, task_prediction
from backends.labelstudio.project_runner import (
    Outcome,
    Summary,
    project_tasks,
    run_tasks,
    task_to_do,
)


def annotate_project(
    api: LabelStudioApi,
    dispatcher: Dispatcher,
    plan: Preannotation,
    project: int,
    *,
    task_ids: Sequence[int] | None = None,
    force: bool = False,
    concurrency: int = 4,
    progress: bool = True,
) -> Summary:
    config = LabelConfig.parse(api.project(project).get("label_config"))
    check_config(plan, config)
    version = plan.model_version(config)

    def work(listed: dict[str, Any]) -> Outcome:
        todo = task_to_do(api, listed, project, version, force=force)
        if todo is None:
            return Outcome.SKIPPED
        prediction = task_prediction(dispatcher, plan, config, todo.task, api.image)
        todo.post(api, prediction["result"], prediction["score"], version)
        return Outcome.DONE

    tasks, total = project_tasks(api, project, task_ids)
    return run_tasks(
        tasks,
        work,
        concurrency=concurrency,
        total=total,
        desc=f"project {project}",
        progress=progress,
    )
