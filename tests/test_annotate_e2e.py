"""Whole-project pre-annotation against the real Label Studio 1.23.2: ``tapmask annotate`` (boxes
and text modes) and Label Studio's own "Retrieve predictions" (``/predict`` without context).

One Label Studio for the module; projects of GrabCut images, one task whose image is missing.
Text mode runs a tiny random Grounding DINO built and loaded through the real loader, GrabCut
segments (weights-free); the masks of random detections mean nothing, the protocol does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backends import masks
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.evaluation.clicker import ground_truth_from_label, iou
from backends.labelstudio.annotate import annotate_project
from backends.labelstudio.api import LabelStudioApi
from backends.labelstudio.labelconfig import LabelConfig
from backends.labelstudio.preannotation import FORMATS, Preannotation
from tests.conftest import REPO
from tests.support.label_studio import (
    TOKEN,
    LabelStudio,
    label_studio_server,
    start_backend,
    stop,
)
from tests.support.preannotate_models import tiny_detector_dir

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/><Label value="Car"/></BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Object"/><Label value="Car"/>
  </PolygonLabels>
  <RectangleLabels name="rect" toName="image">
    <Label value="Object"/><Label value="Car"/>
  </RectangleLabels>
</View>"""
IMAGES = ("teddy.jpg", "banana1.bmp", "flower.jpg")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    with label_studio_server(tmp_path_factory.mktemp("ls-data")) as ls:
        yield ls


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    return tiny_detector_dir(tmp_path_factory.mktemp("models") / "grounding-dino")


def _gt(grabcut_dir: Path, image: str) -> np.ndarray:
    label = grabcut_dir / "boundary_GT" / (Path(image).stem + ".bmp")
    return ground_truth_from_label(cv2.imread(str(label)))


def _project(ls: LabelStudio, grabcut_dir: Path, *, broken: bool = True) -> tuple[int, list[int]]:
    """A project of ``IMAGES`` (task ids in that order) plus, with ``broken``, one task whose
    image does not exist (its id last)."""
    response = ls.api(
        "POST", "/api/projects", json={"title": "pre-annotate", "label_config": CONFIG}
    )
    assert response.status_code == 201, response.text
    project = response.json()["id"]
    for image in IMAGES:
        with (grabcut_dir / "data_GT" / image).open("rb") as handle:
            response = ls.api(
                "POST", f"/api/projects/{project}/import", files={"file": (image, handle)}
            )
        assert response.status_code == 201, response.text
    if broken:
        response = ls.api(
            "POST", f"/api/projects/{project}/import", json=[{"image": "/data/upload/9/gone.jpg"}]
        )
        assert response.status_code == 201, response.text
    tasks = ls.api("GET", "/api/tasks", params={"project": project}).json()["tasks"]
    return project, sorted(t["id"] for t in tasks)


def _rectangle(gt: np.ndarray, label: str = "Object") -> dict:
    """The ground truth's tight box as a Label Studio rectangle (percent of the image)."""
    height, width = gt.shape
    x1, y1, x2, y2 = masks.mask_bbox(gt == 1)
    return {
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": x1 / width * 100,
            "y": y1 / height * 100,
            "width": (x2 - x1 + 1) / width * 100,
            "height": (y2 - y1 + 1) / height * 100,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def _filled_box_iou(gt: np.ndarray) -> float:
    filled = np.zeros(gt.shape, bool)
    x1, y1, x2, y2 = masks.mask_bbox(gt == 1)
    filled[y1 : y2 + 1, x1 : x2 + 1] = True
    return iou(gt, filled)


def _predictions(ls: LabelStudio, task: int, version_prefix: str) -> list[dict]:
    found = ls.api("GET", "/api/predictions", params={"task": task}).json()
    return [p for p in found if p["model_version"].startswith(version_prefix)]


def _brush(region: dict) -> np.ndarray:
    shape = (region["original_height"], region["original_width"])
    rgba = np.reshape(decode_rle(region["value"]["rle"]), (*shape, 4))
    return rgba[:, :, 3] > 0


def test_boxes_mode_turns_every_rectangle_into_a_mask_and_skips_on_rerun(label_studio, grabcut_dir):
    project, tasks = _project(label_studio, grabcut_dir, broken=False)
    gts = {task: _gt(grabcut_dir, image) for task, image in zip(tasks, IMAGES, strict=True)}
    # An annotation on the first task, a prediction (another tool's boxes) on the second.
    body = {"result": [_rectangle(gts[tasks[0]])]}
    response = label_studio.api("POST", f"/api/tasks/{tasks[0]}/annotations", json=body)
    assert response.status_code == 201, response.text
    body = {"task": tasks[1], "result": [_rectangle(gts[tasks[1]], "Car")], "model_version": "yolo"}
    assert label_studio.api("POST", "/api/predictions", json=body).status_code == 201

    engine = Engine()
    engine.load(["grabcut"])
    dispatcher = LocalDispatcher(engine)
    plan = Preannotation("boxes", "grabcut", formats=FORMATS["both"])
    with LabelStudioApi(label_studio.url, TOKEN) as api:
        assert [t["id"] for t in api.tasks(project, page_size=2)] == tasks  # 2 pages, then 404
        summary = annotate_project(api, dispatcher, plan, project, progress=False)
        assert (summary.done, summary.skipped, summary.failed) == (3, 0, [])
        for task, label in zip(tasks[:2], ("Object", "Car"), strict=True):
            (prediction,) = _predictions(label_studio, task, "tapmask boxes grabcut")
            brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
            poly = next(r for r in prediction["result"] if r["type"] == "polygonlabels")
            assert brush["value"]["brushlabels"] == [label] == poly["value"]["polygonlabels"]
            assert iou(gts[task], _brush(brush)) > _filled_box_iou(gts[task])  # a mask
            assert prediction["score"] == pytest.approx(
                min(r["score"] for r in prediction["result"])
            )
        (empty,) = _predictions(label_studio, tasks[2], "tapmask boxes")  # no rectangle: done
        assert empty["result"] == [] and empty["score"] == 0

        again = annotate_project(api, dispatcher, plan, project, progress=False)
        assert (again.done, again.skipped) == (0, 3)
        forced = annotate_project(
            api, dispatcher, plan, project, task_ids=tasks[:1], force=True, progress=False
        )
        assert (forced.done, forced.skipped) == (1, 0)
        assert len(_predictions(label_studio, tasks[0], "tapmask boxes")) == 1  # replaced
    dispatcher.close()


def _annotate_cli(
    ls: LabelStudio, project: int, detector_dir: Path, *extra: str
) -> subprocess.Popen:
    env = {
        **os.environ,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "TAPMASK_MAX_INSTANCES": "2",  # a few masks per image keep the test quick
        "PYTHONPATH": str(REPO),
    }
    args = [sys.executable, "-m", "backends.cli", "annotate", "--project", str(project)]
    args += ["--mode", "text", "--model", "grabcut", "--label-studio", ls.url]
    args += ["--plugin", "tests.support.preannotate_models", "--detector", "test-grounding-dino"]
    args += ["--detector-checkpoint", str(detector_dir), "--box-threshold", "0"]
    args += ["--text-threshold", "0", "--prompt", "Car=car . truck", *extra]
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_text_mode_cli_killed_midway_resumes_and_reports_the_unreadable_task(
    label_studio, grabcut_dir, detector_dir
):
    project, tasks = _project(label_studio, grabcut_dir)
    version = "tapmask text grabcut+test-grounding-dino brush"

    # First run, one task at a time, killed (SIGKILL: no clean-up) once a prediction is stored.
    first = _annotate_cli(label_studio, project, detector_dir, "--concurrency", "1")
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if any(_predictions(label_studio, task, version) for task in tasks):
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGKILL)
    first.wait()
    stored = [task for task in tasks if _predictions(label_studio, task, version)]
    assert 1 <= len(stored) < len(tasks)

    second = _annotate_cli(label_studio, project, detector_dir, "--concurrency", "2")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1, err  # one task failed: reported, the others done
    assert f"{len(tasks)} tasks: {len(tasks) - 1 - len(stored)} done, {len(stored)} skipped" in out
    assert f"task {tasks[-1]}:" in out and "gone.jpg" in out
    assert "task/s" in err or "s/task" in err  # tqdm's rate (and ETA) on stderr
    assert TOKEN not in out + err
    found = 0
    for task in tasks[:-1]:
        (prediction,) = _predictions(label_studio, task, version)  # exactly one: resumed, skipped
        assert "Car=car . truck" in prediction["model_version"]
        regions = prediction["result"]
        assert len(regions) <= 2  # TAPMASK_MAX_INSTANCES (a tiny box's empty mask is dropped)
        found += len(regions)
        for region in regions:
            assert region["type"] == "brushlabels"
            assert region["value"]["brushlabels"][0] in ("Object", "Car")
            assert _brush(region).any()
        assert prediction["score"] == pytest.approx(min((r["score"] for r in regions), default=0))
    assert found
    assert not _predictions(label_studio, tasks[-1], version)


def _connect(ls: LabelStudio, project: int, backend: str, extra: dict | None = None) -> None:
    body = {"url": backend, "project": project, "title": "tapmask", "is_interactive": False}
    if extra is not None:
        body["extra_params"] = extra
    response = ls.api("POST", "/api/ml", json=body)
    assert response.status_code == 201, response.text


def _retrieve(ls: LabelStudio, project: int) -> None:
    """Label Studio's Data Manager action "Retrieve Predictions" on every task (the budget is
    tested in test_retrieve.py)."""
    response = ls.api(
        "POST",
        "/api/dm/actions/",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert response.status_code == 200, response.text


def test_retrieve_predictions_returns_masks_when_the_project_opts_in(label_studio, grabcut_dir):
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN}
    url, process = start_backend(env)
    try:
        opted, tasks = _project(label_studio, grabcut_dir)
        for task, image in zip(tasks[:2], IMAGES, strict=False):
            body = {"result": [_rectangle(_gt(grabcut_dir, image))]}
            assert label_studio.api("POST", f"/api/tasks/{task}/annotations", json=body).is_success
        _connect(label_studio, opted, url, {"retrieve": "boxes", "format": "both"})
        _retrieve(label_studio, opted)
        version = Preannotation("boxes", "grabcut", formats=FORMATS["both"]).model_version(
            LabelConfig.parse(CONFIG)
        )  # the same as `tapmask annotate --mode boxes --format both`
        for task, image in zip(tasks[:2], IMAGES, strict=False):
            (prediction,) = _predictions(label_studio, task, version)
            brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
            gt = _gt(grabcut_dir, image)
            assert iou(gt, _brush(brush)) > _filled_box_iou(gt)
        _retrieve(label_studio, opted)  # again: nothing twice
        assert all(len(_predictions(label_studio, t, version)) == 1 for t in tasks[:2])

        plain, plain_tasks = _project(label_studio, grabcut_dir, broken=False)
        _connect(label_studio, plain, url)  # no opt-in: prefetch only, as before
        _retrieve(label_studio, plain)
        assert not any(_predictions(label_studio, t, "") for t in plain_tasks)
    finally:
        stop(process)
