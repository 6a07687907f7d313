"""Video regions end to end with a real Label Studio 1.23.2 and the real backend process.

A video project with the README's config, an MP4 uploaded as its task, the backend connected as
an interactive ML backend. The calls are the ones Label Studio's editor makes when a label is
applied to a video box (``POST /api/ml/{id}/interactive-annotating`` with the regions of that
label as context); the answer is then stored as a prediction (Label Studio's prediction
validation on: see ``tests/support/label_studio.py``) and read back through the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from backends.video.synthetic import build_clip
from tests.support.label_studio import LabelStudio, label_studio_server, start_backend, stop
from tests.support.video_clips import box_iou, percent_box, write_mp4
from tests.test_labelstudio_video import CONFIG, FPS

FRAMES = 50


@dataclass
class VideoProject:
    id: int
    task_id: int
    ml_id: int
    video: str  # the task's data.video as Label Studio stores it
    truth: list[list[np.ndarray]]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    with label_studio_server(tmp_path_factory.mktemp("ls-data")) as ls:
        yield ls


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    url, process = start_backend({"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def project(label_studio, backend, tmp_path_factory, grabcut_dir) -> VideoProject:
    ls = label_studio
    clip = build_clip(grabcut_dir, objects=2, frames=FRAMES, width=480, height=270, seed=1)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    truth = write_mp4(clip, path, FPS)
    response = ls.api("POST", "/api/projects", json={"title": "video", "label_config": CONFIG})
    assert response.status_code == 201, response.text  # Label Studio accepts the README config
    project_id = response.json()["id"]
    with path.open("rb") as handle:
        response = ls.api(
            "POST",
            f"/api/projects/{project_id}/import",
            files={"file": ("clip.mp4", handle, "video/mp4")},
        )
    assert response.status_code == 201, response.text
    task = ls.api("GET", "/api/tasks", params={"project": project_id}).json()["tasks"][0]
    response = ls.api(
        "POST",
        "/api/ml",
        json={"url": backend, "project": project_id, "title": "tapmask", "is_interactive": True},
    )
    assert response.status_code == 201, response.text
    return VideoProject(project_id, task["id"], response.json()["id"], task["data"]["video"], truth)


def _drawn_region(truth: list[list[np.ndarray]], obj: int, frame: int, region_id: str) -> dict:
    """What the editor sends for a box drawn on ``frame`` and then labelled."""
    return {
        "id": region_id,
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "origin": "manual",
        "value": {
            "framesCount": FRAMES,
            "duration": FRAMES / FPS,
            "sequence": [
                {
                    "frame": frame,
                    "enabled": True,
                    "rotation": 0,
                    "time": frame / FPS,
                    **percent_box(truth[frame - 1][obj]),
                }
            ],
            "labels": ["Object"],
        },
    }


def test_label_studio_relays_the_track_and_stores_it_as_a_prediction(label_studio, project):
    assert project.video.startswith("/data/upload/")  # fetched with Label Studio's token
    regions = [
        _drawn_region(project.truth, 0, 1, "obj_a"),
        _drawn_region(project.truth, 1, 11, "obj_b"),
    ]
    response = label_studio.api(
        "POST",
        f"/api/ml/{project.ml_id}/interactive-annotating",
        json={"task": project.task_id, "context": {"result": regions}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    tracked = body["data"]["result"]
    assert [r["id"] for r in tracked] == ["obj_a", "obj_b"]
    for region, obj, first in zip(tracked, (0, 1), (1, 11), strict=True):
        sequence = region["value"]["sequence"]
        assert sequence[0]["frame"] == first and len(sequence) >= 30
        ious = [box_iou(k, project.truth[k["frame"] - 1][obj]) for k in sequence]
        assert np.mean(ious) >= 0.6, (region["id"], ious)

    # Stored as a prediction (validated against the config) and read back unchanged.
    response = label_studio.api(
        "POST",
        "/api/predictions",
        json={
            "task": project.task_id,
            "result": tracked,
            "score": body["data"]["score"],
            "model_version": "tapmask-video-e2e",
        },
    )
    assert response.status_code == 201, response.text
    stored = label_studio.api("GET", f"/api/predictions/{response.json()['id']}").json()
    assert stored["result"] == tracked
    task = label_studio.api("GET", f"/api/tasks/{project.task_id}").json()
    assert [p["model_version"] for p in task["predictions"]] == ["tapmask-video-e2e"]


def test_label_studio_refuses_a_malformed_video_prediction(label_studio, project):
    """The check above can fail: Label Studio's validation refuses a videorectangle result
    whose region names no control of the config."""
    region = _drawn_region(project.truth, 0, 1, "bad")
    region["from_name"] = "no_such_control"
    response = label_studio.api(
        "POST",
        "/api/predictions",
        json={"task": project.task_id, "result": [region], "model_version": "bad"},
    )
    assert response.status_code == 400, response.text
