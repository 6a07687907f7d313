"""Video regions end to end with a real Label Studio 1.23.2 and the real backend process.

A video project with the README's config, an MP4 uploaded as its task, the backend connected as
an interactive ML backend. The calls are the ones Label Studio's editor makes when a label is
applied to a video box (``POST /api/ml/{id}/interactive-annotating`` with the regions of that
label as context); the answer is then stored as a prediction (Label Studio's prediction
validation on: see ``tests/support/label_studio.py``) and read back through the API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from backends.video.synthetic import build_clip
from tests.conftest import REPO
from tests.support.label_studio import (
    TOKEN,
    LabelStudio,
    label_studio_server,
    start_backend,
    stop,
)
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


# --------------------------------------------------------------------------------------------
# tapmask track --project N


def _track_cli(ls: LabelStudio, project: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABEL_STUDIO_API_KEY": TOKEN, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "backends.cli", "track", "--project", str(project)]
    args += ["--label-studio", ls.url, "--seconds", "1.2", *extra]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _upload(ls: LabelStudio, project: int, name: str, data: bytes) -> None:
    response = ls.api(
        "POST", f"/api/projects/{project}/import", files={"file": (name, data, "video/mp4")}
    )
    assert response.status_code == 201, response.text


def test_track_command_tracks_a_whole_project_resumably(label_studio, tmp_path, grabcut_dir):
    ls = label_studio
    response = ls.api("POST", "/api/projects", json={"title": "track", "label_config": CONFIG})
    assert response.status_code == 201, response.text
    project = response.json()["id"]
    truths = {}
    for seed in (4, 5):
        clip = build_clip(grabcut_dir, objects=2, frames=40, width=320, height=180, seed=seed)
        truths[seed] = write_mp4(clip, tmp_path / f"clip{seed}.mp4", FPS)
        _upload(ls, project, f"clip{seed}.mp4", (tmp_path / f"clip{seed}.mp4").read_bytes())
    _upload(ls, project, "broken.mp4", b"this is no video" * 100)
    tasks = ls.api("GET", "/api/tasks", params={"project": project}).json()["tasks"]
    by_name = {t["data"]["video"].rsplit("-", 1)[-1]: t["id"] for t in tasks}
    assert sorted(by_name) == ["broken.mp4", "clip4.mp4", "clip5.mp4"]
    # The annotators' keyframes: two objects on clip 4 (frames 1 and 5), one on clip 5; the
    # broken video's task has one too.
    annotations = {
        "clip4.mp4": [
            _drawn_region(truths[4], 0, 1, "a0"),
            _drawn_region(truths[4], 1, 5, "a1"),
        ],
        "clip5.mp4": [_drawn_region(truths[5], 0, 1, "b0")],
        "broken.mp4": [_drawn_region(truths[5], 0, 1, "c0")],
    }
    for name, result in annotations.items():
        response = ls.api(
            "POST", f"/api/tasks/{by_name[name]}/annotations", json={"result": result}
        )
        assert response.status_code == 201, response.text

    first = _track_cli(ls, project)
    assert first.returncode == 1, first.stderr  # one task failed, the run went on
    assert "3 tasks: 2 done, 0 skipped (already done), 1 failed" in first.stdout, first.stdout
    assert f"task {by_name['broken.mp4']}:" in first.stdout and "video" in first.stdout
    assert "100%" in first.stderr  # the progress bar ran to the end

    version = next(
        p["model_version"]
        for p in ls.api("GET", f"/api/tasks/{by_name['clip4.mp4']}").json()["predictions"]
    )
    assert version.endswith("-track-flow")
    for name, seed in (("clip4.mp4", 4), ("clip5.mp4", 5)):
        [prediction] = ls.api("GET", f"/api/tasks/{by_name[name]}").json()["predictions"]
        regions = {r["id"]: r for r in prediction["result"]}
        assert set(regions) == {r["id"] for r in annotations[name]}
        for drawn in annotations[name]:
            start = drawn["value"]["sequence"][0]["frame"]
            obj = 0 if drawn["id"].endswith("0") else 1
            sequence = regions[drawn["id"]]["value"]["sequence"]
            assert sequence[0]["frame"] == start and len(sequence) >= 25  # 1.2 s at 25 fps
            ious = [box_iou(k, truths[seed][k["frame"] - 1][obj]) for k in sequence]
            assert np.mean(ious) >= 0.6, (name, drawn["id"], ious)

    # Run again: what was posted is skipped, the broken task fails again and is reported.
    again = _track_cli(ls, project)
    assert "3 tasks: 0 done, 2 skipped (already done), 1 failed" in again.stdout, again.stdout
    # --force redoes a task: a new prediction replaces the old one.
    forced = _track_cli(ls, project, "--force", "--tasks", str(by_name["clip5.mp4"]))
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "1 tasks: 1 done" in forced.stdout
    predictions = ls.api("GET", f"/api/tasks/{by_name['clip5.mp4']}").json()["predictions"]
    assert len(predictions) == 1 and predictions[0]["model_version"] == version
