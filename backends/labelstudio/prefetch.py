"""``tapmask prefetch --project N``: warm the running backend's embeddings for a whole project.

Reads the project's tasks from Label Studio and posts them in batches to the backend's
``/predict`` with no context, exactly like Label Studio's "Retrieve predictions": the backend
queues the embeddings in the background (on the worker pool's batch queues when it uses Redis),
so annotators' first clicks are decodes only.
"""

from __future__ import annotations

import os
import sys

import httpx
from tqdm import tqdm

from backends.labelstudio.client import Credentials, ImageClient


def prefetch_project(project: int, backend: str, ls_url: str | None, batch: int) -> int:
    if not ls_url:
        print("tapmask prefetch: set LABEL_STUDIO_URL or pass --label-studio", file=sys.stderr)
        return 2
    creds = Credentials(ls_url, os.environ.get("LABEL_STUDIO_API_KEY"))
    image_client = ImageClient()
    with httpx.Client(base_url=ls_url, timeout=60, trust_env=False) as ls:
        headers = image_client.auth_header(creds)
        project_info = ls.get(f"/api/projects/{project}", headers=headers)
        project_info.raise_for_status()
        label_config = project_info.json()["label_config"]
        tasks: list[dict] = []
        page = 1
        while True:
            response = ls.get(
                "/api/tasks",
                params={"project": project, "page": page, "page_size": 100},
                headers=headers,
            )
            if response.status_code == 404:
                break  # past the last page
            response.raise_for_status()
            body = response.json()
            chunk = body.get("tasks", body) if isinstance(body, dict) else body
            if not chunk:
                break
            tasks.extend(chunk)
            total = body.get("total") if isinstance(body, dict) else None
            if total is not None and len(tasks) >= total:
                break
            page += 1
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
