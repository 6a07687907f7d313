"""Label Studio's "Retrieve predictions" (``/predict`` without context) for projects that opt in:
the backend app with a fake Label Studio serving the image (the real one: test_annotate_e2e)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends import masks
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.labelstudio.app import Settings, create_app
from backends.labelstudio.client import ImageClient
from backends.models.grabcut import GrabCutSegmenter
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.test_labelstudio import CONFIG

VERSION = "tapmask boxes grabcut brush"


class SlowGrabCut(GrabCutSegmenter):
    def decode(self, *args, **kwargs):
        time.sleep(1.0)
        return super().decode(*args, **kwargs)


@pytest.fixture()
def fake_ls(grabcut_dir):
    server = FakeLabelStudio()
    server.files["/data/upload/1/teddy.jpg"] = (
        (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes(),
        "image/jpeg",
    )
    yield server
    server.close()


def _client(fake_ls, segmenter=None, **settings) -> TestClient:
    engine = Engine({"grabcut": segmenter or GrabCutSegmenter()})
    settings = Settings(
        model="grabcut", label_studio_url=fake_ls.url, api_key=fake_ls.legacy_token, **settings
    )
    return TestClient(create_app(LocalDispatcher(engine), settings, ImageClient(timeout=5)))


def _task(task_id: int, predictions: list | None = None) -> dict:
    rect = {
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 284,
        "original_height": 398,
        "value": {"x": 20, "y": 10, "width": 60, "height": 80, "rectanglelabels": ["Object"]},
    }
    return {
        "id": task_id,
        "data": {"image": "/data/upload/1/teddy.jpg"},
        "annotations": [{"result": [rect]}],
        "predictions": predictions or [],
    }


def _retrieve(client: TestClient, tasks: list[dict]) -> list:
    body = {"tasks": tasks, "project": "1.17", "label_config": CONFIG, "params": {"context": None}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_without_opt_in_retrieve_stays_prefetch_only(fake_ls):
    with _client(fake_ls) as client:
        assert _retrieve(client, [_task(1)]) == []


def test_extra_params_opt_a_project_in(fake_ls):
    with _client(fake_ls) as client:
        extra = {"retrieve": "boxes", "format": "brush"}
        setup = {"project": "1.17", "hostname": fake_ls.url, "extra_params": extra}
        assert client.post("/setup", json=setup).status_code == 200
        held = [{"model_version": VERSION, "result": []}]
        first, second = _retrieve(client, [_task(1), _task(2, held)])
        assert second == []  # already holds this version's prediction: none twice
        assert first["model_version"] == VERSION
        (region,) = first["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Object"]
        mask = masks.ls_rle_to_mask(region["value"]["rle"], 398, 284)
        rows, cols = np.nonzero(mask)
        assert mask.any() and cols.max() < 0.8 * 284 + 2 and rows.max() < 0.9 * 398 + 2
        assert first["score"] == region["score"]
        bad = {**setup, "extra_params": {"retrieve": "everything"}}
        response = client.post("/setup", json=bad)
        assert response.status_code == 422 and "retrieve" in response.json()["detail"]


def test_retrieve_answers_within_its_budget(fake_ls, monkeypatch, caplog):
    monkeypatch.setenv("TAPMASK_RETRIEVE_BUDGET_S", "0.5")
    with _client(fake_ls, SlowGrabCut(), retrieve="boxes") as client:
        started = time.monotonic()
        results = _retrieve(client, [_task(i) for i in range(1, 5)])
        assert time.monotonic() - started < 1.8  # 4 tasks of 1 s each, 2 at a time: 2 s
    assert results == [[], [], [], []]
    assert "not pre-annotated within 0.5 s (TAPMASK_RETRIEVE_BUDGET_S)" in caplog.text
