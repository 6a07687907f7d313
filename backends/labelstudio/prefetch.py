"""``tapmask prefetch --project N``: warm the running backend's embeddings for a whole project.

Reads the project's tasks from Label Studio (``api.LabelStudioApi``) and posts them in batches to
the backend's ``/predict`` with no context, exactly like Label Studio's "Retrieve predictions":
the backend queues the embeddings in the background (on the worker pool's batch queues when it
uses Redis), so annotators' first clicks are decodes only.
"""

from __future__ import annotations

import sys

import httpx
from tqdm import tqdm

from backends.labelstudio.api import LabelStudioApi


def prefetch_project(project: int, backend: str, ls_url: str | None, batch: int) -> int:
    if not ls_url:
        print("tapmask prefetch: set LABEL_STUDIO_URL or pass --label-studio", file=sys.stderr)
        return 2
    with LabelStudioApi(ls_url) as api:
        label_config = api.project(project)["label_config"]
        tasks = list(api.tasks(project))
    with (
        httpx.Client(base_url=backend, timeout=100, trust_env=False) as tapmask,
        tqdm(total=len(tasks), unit="task", desc=f"project {project}") as bar,
    ):
        for start in range(0, len(tasks), batch):
            chunk = tasks[start : start + batch]
            response = tapmask.post(
                "/predict",
                json={
                    "tasks": chunk,
                    "project": str(project),
                    "label_config": label_config,
                    "params": {"context": None},
                },
            )
            response.raise_for_status()
            bar.update(len(chunk))
    print(f"queued {len(tasks)} task(s) of project {project} for embedding on {backend}")
    return 0
