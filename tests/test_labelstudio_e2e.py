"""End to end with a real Label Studio 1.23.2 and the real `tapmask serve labelstudio` process.

Label Studio lives in its own venv (`make test` installs it: .venv-labelstudio). The calls below
are the ones its frontend makes: connect an interactive ML backend, then
`POST /api/ml/{id}/interactive-annotating` with the smart regions as context.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backends.evaluation.clicker import ground_truth_from_label, iou, next_click
from tests.conftest import REPO
from tests.support.label_studio import (
    TOKEN,
    LabelStudio,
    label_studio_server,
    start_backend,
    stop,
)

# The labeling config users copy from the README: the test proves that one works.
CONFIG = (
    (REPO / "README.md").read_text().split("<!-- labeling-config -->\n```xml\n")[1].split("```")[0]
)


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


@dataclass
class Project:
    id: int
    task_id: int
    ml_id: int
    gt: np.ndarray


def _project(
    ls: LabelStudio, backend_url: str, grabcut_dir: Path, image: str = "teddy.jpg"
) -> Project:
    response = ls.api(
        "POST", "/api/projects", json={"title": "tapmask e2e", "label_config": CONFIG}
    )
    assert response.status_code == 201, response.text
    project_id = response.json()["id"]
    path = grabcut_dir / "data_GT" / image
    with path.open("rb") as handle:
        response = ls.api(
            "POST",
            f"/api/projects/{project_id}/import",
            files={"file": (image, handle, "image/jpeg")},
        )
    assert response.status_code == 201, response.text
    tasks = ls.api("GET", "/api/tasks", params={"project": project_id}).json()
    task_id = tasks["tasks"][0]["id"]
    response = ls.api(
        "POST",
        "/api/ml",
        json={
            "url": backend_url,
            "project": project_id,
            "title": "tapmask",
            "is_interactive": True,
        },
    )
    assert response.status_code == 201, response.text
    label = grabcut_dir / "boundary_GT" / (Path(image).stem + ".bmp")
    gt = ground_truth_from_label(cv2.imread(str(label)))
    return Project(project_id, task_id, response.json()["id"], gt)


def _keypoint(x_pct: float, y_pct: float, positive: bool, index: int) -> dict:
    return {
        "original_width": 284,
        "original_height": 398,
        "image_rotation": 0,
        "value": {
            "x": x_pct,
            "y": y_pct,
            "width": 0.35,
            "labels": ["Object"],
            "keypointlabels": ["Object"],
        },
        "is_positive": positive,
        "id": f"kp_{index}",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def _interact(ls: LabelStudio, project: Project, result: list[dict]) -> list[dict]:
    response = ls.api(
        "POST",
        f"/api/ml/{project.ml_id}/interactive-annotating",
        json={"task": project.task_id, "context": {"result": result}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]["result"]


def _brush_mask(regions: list[dict]) -> np.ndarray:
    brush = next(r for r in regions if r["type"] == "brushlabels")
    rgba = np.reshape(decode_rle(brush["value"]["rle"]), (398, 284, 4))
    assert rgba.max() == 255
    return rgba[:, :, 3] > 0


def _pct(row: int, col: int) -> tuple[float, float]:
    return (col + 0.5) / 284 * 100, (row + 0.5) / 398 * 100


@pytest.fixture(scope="module")
def project(label_studio, backend, grabcut_dir) -> Project:
    return _project(label_studio, backend, grabcut_dir)


def test_clicks_and_box_through_label_studio(label_studio, project):
    gt = project.gt
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))
    first = _interact(label_studio, project, [_keypoint(*_pct(row, col), True, 0)])
    mask = _brush_mask(first)
    assert mask[row, col] and iou(gt, mask) > 0.3
    nrow, ncol, positive = next_click(gt, mask, [(row, col)])
    pair = [_keypoint(*_pct(row, col), True, 0), _keypoint(*_pct(nrow, ncol), positive, 1)]
    regions = _interact(label_studio, project, pair)
    assert iou(gt, _brush_mask(regions)) >= 0.5
    poly = next(r for r in regions if r["type"] == "polygonlabels")
    assert len(poly["value"]["points"]) >= 3

    rows, cols = np.nonzero(gt == 1)
    box = {
        "x": cols.min() / 284 * 100,
        "y": rows.min() / 398 * 100,
        "width": (cols.max() - cols.min() + 1) / 284 * 100,
        "height": (rows.max() - rows.min() + 1) / 398 * 100,
        "rotation": 0,
        "rectanglelabels": ["Object"],
    }
    rect = {
        "original_width": 284,
        "original_height": 398,
        "image_rotation": 0,
        "value": box,
        "id": "rect_0",
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }
    assert iou(gt, _brush_mask(_interact(label_studio, project, [rect]))) >= 0.5

    # The annotator's result is storable as a prediction with Label Studio's validation on.
    response = label_studio.api(
        "POST",
        "/api/predictions",
        json={
            "task": project.task_id,
            "result": regions,
            "score": regions[0]["score"],
            "model_version": "tapmask-e2e",
        },
    )
    assert response.status_code == 201, response.text
    stored = label_studio.api("GET", f"/api/predictions/{response.json()['id']}").json()
    assert {r["type"] for r in stored["result"]} == {"brushlabels", "polygonlabels"}


def test_prefetch_command_warms_the_backend_for_a_whole_project(label_studio, backend, grabcut_dir):
    def embeddings_cached() -> float:
        text = httpx.get(backend + "/metrics", timeout=10).text
        line = next(
            x for x in text.splitlines() if x.startswith('tapmask_cache_entries{cache="embeddings')
        )
        return float(line.split()[-1])

    fresh = _project(label_studio, backend, grabcut_dir, image="106024.jpg")
    before = embeddings_cached()
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backends.cli",
            "prefetch",
            "--project",
            str(fresh.id),
            "--backend",
            backend,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "queued 1 task(s)" in proc.stdout
    assert "100%" in proc.stderr  # the progress bar ran to the end
    deadline = time.time() + 30
    while embeddings_cached() <= before and time.time() < deadline:
        time.sleep(0.2)
    assert embeddings_cached() == before + 1  # the new project's image, computed in background


def test_personal_access_token_with_legacy_tokens_disabled(label_studio, grabcut_dir):
    response = label_studio.api("POST", "/api/token/")
    assert response.status_code in (200, 201), response.text
    pat = response.json()["token"]
    bearer = LabelStudio(
        label_studio.url, {"Authorization": f"Bearer {_access(label_studio, pat)}"}
    )
    settings = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
    response = bearer.api("POST", "/api/jwt/settings", json=settings)
    assert response.status_code in (200, 201), response.text
    url, process = start_backend(
        {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": pat}
    )
    try:
        # Label Studio's /setup still pushes the (now refused) legacy token: the PAT must win.
        pat_project = _project(bearer, url, grabcut_dir)
        row, col, _ = next_click(pat_project.gt, np.zeros(pat_project.gt.shape, bool))
        regions = _interact(bearer, pat_project, [_keypoint(*_pct(row, col), True, 0)])
        assert _brush_mask(regions)[row, col]
    finally:
        stop(process)
        bearer.api(
            "POST", "/api/jwt/settings", json={**settings, "legacy_api_tokens_enabled": True}
        )


def _access(ls: LabelStudio, pat: str) -> str:
    response = httpx.post(ls.url + "/api/token/refresh/", json={"refresh": pat}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["access"]


def test_edgetam_through_label_studio(label_studio, grabcut_dir, edgetam_dir):
    """The CPU-class SAM 2 served to the real Label Studio (random weights: the mask is not
    meaningful, the protocol is: a visible brush of the natural size and a polygon)."""
    args = ("--model", "edgetam", "--checkpoint", str(edgetam_dir), "--device", "cpu")
    url, process = start_backend({"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}, args)
    try:
        edgetam_project = _project(label_studio, url, grabcut_dir)
        row, col, _ = next_click(edgetam_project.gt, np.zeros(edgetam_project.gt.shape, bool))
        clicks = [_keypoint(*_pct(row, col), True, 0)]
        assert _brush_mask(_interact(label_studio, edgetam_project, clicks)).any()
        clicks.append(_keypoint(*_pct(5, 5), False, 1))
        regions = _interact(label_studio, edgetam_project, clicks)
        assert {r["type"] for r in regions} == {"brushlabels", "polygonlabels"}
        assert all(r["value"].get("brushlabels", r["value"].get("polygonlabels")) for r in regions)
    finally:
        stop(process)


def test_a_click_on_a_stored_prediction_refines_it(label_studio, backend, grabcut_dir):
    """Label Studio sends the task's predictions along with an interactive click
    (``BaseExportDataSerializerForInteractive``): a lone negative click on a coarse brush
    prediction trims that prediction (a lone negative click alone has no object to segment)."""
    from backends import masks
    from backends.evaluation.refine import coarse_mask

    fresh = _project(label_studio, backend, grabcut_dir)
    existing = coarse_mask(fresh.gt, "dilate15")
    region = {
        "id": "coarse1",
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 284,
        "original_height": 398,
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": masks.mask_to_ls_rle(existing),
            "brushlabels": ["Object"],
        },
    }
    response = label_studio.api(
        "POST",
        "/api/predictions",
        json={"task": fresh.task_id, "result": [region], "score": 0.5, "model_version": "coarse"},
    )
    assert response.status_code == 201, response.text
    row, col, positive = next_click(fresh.gt, existing)
    assert not positive
    mask = _brush_mask(_interact(label_studio, fresh, [_keypoint(*_pct(row, col), False, 0)]))
    assert not mask[row, col] and mask.sum() < existing.sum()
    assert iou(fresh.gt, mask) > iou(fresh.gt, existing) + 0.1
