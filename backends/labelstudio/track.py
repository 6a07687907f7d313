"""``tapmask track --project N``: track every keyframed video region of a Label Studio project.

Each task (``project_runner.run_tasks``: bounded concurrency, a progress bar, one failure never
fatal) is read in full; its ``videorectangle`` regions come from its annotations (not cancelled,
newest first) and then its predictions of other model versions, one per region id. Every region
whose last keyframe was placed by a person (``VideoRegion.start``) is tracked forward with
``VideoTracking`` (to the end of the video, at most ``TAPMASK_MAX_TRACK_FRAMES`` frames, or
``--seconds``) through the dispatcher's batch queue, so annotators' interactive requests
overtake it on a shared worker pool. The task's regions, tracked ones continued, are posted as
one prediction of this run's ``model_version``.

A task already holding a prediction of that version is skipped (a killed run is simply started
again); ``--force`` tracks it again, posting the new prediction before deleting the old ones,
so a failure never loses one. A task without a region to track is skipped and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from backends import __version__
from backends.dispatch import Dispatcher
from backends.errors import LabelConfigError
from backends.labelstudio.api import LabelStudioApi
from backends.labelstudio.labelconfig import VIDEO_TYPES, LabelConfig
from backends.labelstudio.project_runner import (
    Outcome,
    Summary,
    project_tasks,
    run_tasks,
    task_to_do,
)
from backends.labelstudio.video import VideoTracking
from backends.labelstudio.videoregions import VideoRegion, parse_region

log = logging.getLogger("tapmask.track")


def model_version(tracker: str) -> str:
    return f"tapmask-{__version__}-track-{tracker}"


def task_regions(task: dict[str, Any], version: str) -> list[tuple[VideoRegion, dict[str, Any]]]:
    """The task's video regions (parsed, raw), one per id: annotations first (newest first),
    then predictions of other model versions."""
    annotations = sorted(
        (a for a in task.get("annotations") or [] if not a.get("was_cancelled")),
        key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""),
        reverse=True,
    )
    predictions = [p for p in task.get("predictions") or [] if p.get("model_version") != version]
    regions: dict[str, tuple[VideoRegion, dict[str, Any]]] = {}
    for source in (*annotations, *predictions):
        for index, item in enumerate(source.get("result") or []):
            if not isinstance(item, dict) or item.get("type") not in VIDEO_TYPES:
                continue
            region = parse_region(item, f"task {task.get('id')} result[{index}]")
            regions.setdefault(region.id, (region, item))
    return list(regions.values())


def track_project(
    api: LabelStudioApi,
    dispatcher: Dispatcher,
    project: int,
    *,
    tracker: str = "flow",
    seconds: float | None = None,
    task_ids: Sequence[int] | None = None,
    force: bool = False,
    concurrency: int = 2,
    progress: bool = True,
) -> Summary:
    """Track the project's video regions and post them as predictions (module docstring)."""
    config = LabelConfig.parse(api.project(project).get("label_config"))
    if not config.videos or not any(c.type in VIDEO_TYPES for c in config.controls):
        raise LabelConfigError(
            f"project {project}'s labeling config has no <Video> with a <VideoRectangle>"
        )
    version = model_version(tracker)
    tracking = VideoTracking(
        dispatcher,
        api.images,
        tracker=tracker,
        seconds=seconds,
        deadline_s=float("inf"),
        batch=True,
    )

    def work(listed: dict[str, Any]) -> Outcome:
        todo = task_to_do(api, listed, project, version, force=force)
        if todo is None:
            return Outcome.SKIPPED
        task = todo.task
        found = task_regions(task, version)
        if not any(region.start() is not None for region, _ in found):
            log.info("task %s: no keyframed video region to track", task["id"])
            return Outcome.SKIPPED
        regions = [region for region, _ in found]
        tracked = tracking.track_task(task, config, regions, api.credentials)
        result = [t.result if t else raw for t, (_, raw) in zip(tracked, found, strict=True)]
        done = [t for t in tracked if t is not None]
        score = sum(t.result["score"] for t in done) / len(done)
        todo.post(api, result, score, version)
        log.info(
            "task %s: %d region(s) tracked over %d frame(s) (%d lost)",
            task["id"],
            len(done),
            sum(t.frames for t in done),
            sum(t.lost for t in done),
        )
        return Outcome.DONE

    tasks, total = project_tasks(api, project, task_ids)
    try:
        return run_tasks(
            tasks,
            work,
            concurrency=concurrency,
            total=total,
            desc=f"project {project}",
            progress=progress,
        )
    finally:
        tracking.close()
