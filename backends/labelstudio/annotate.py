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
from backends.errors import InvalidRequest
from backends.labelstudio.api import LabelStudioApi
from backends.labelstudio.labelconfig import LabelConfig
from backends.labelstudio.preannotation import Preannotation, check_config, task_prediction
from backends.labelstudio.project_runner import Outcome, Summary, run_tasks


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
        task = api.task(int(listed["id"]))
        if int(task.get("project") or project) != project:
            raise InvalidRequest(f"task {task['id']} belongs to project {task.get('project')}")
        mine = [p for p in task.get("predictions") or [] if p.get("model_version") == version]
        if mine and not force:
            return Outcome.SKIPPED
        prediction = task_prediction(dispatcher, plan, config, task, api.image)
        api.post_prediction(task["id"], prediction["result"], prediction["score"], version)
        for old in mine:
            api.delete_prediction(int(old["id"]))
        return Outcome.DONE

    total = len(task_ids) if task_ids is not None else api.count_tasks(project)
    tasks = ({"id": int(i)} for i in task_ids) if task_ids is not None else api.tasks(project)
    return run_tasks(
        tasks,
        work,
        concurrency=concurrency,
        total=total,
        desc=f"project {project}",
        progress=progress,
    )
