"""Both front ends (the Label Studio app and the CVAT handler) served by one Redis worker.

Configuration only: the same front-end code as in-process, with ``TAPMASK_REDIS_URL`` set.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends.dispatch import dispatcher_from_env
from backends.evaluation.clicker import ground_truth_from_label, iou, next_click
from backends.labelstudio.app import Settings, create_app
from backends.labelstudio.client import ImageClient
from backends.redis.dispatcher import RedisDispatcher
from tests.support.cvat_harness import NuclioFunction, check_mask_reply, cvat_payload, function_env
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.support.processes import RedisServer, WorkerProcess
from tests.test_labelstudio import CONFIG, _keypoint, _predict_body


@pytest.fixture(scope="module")
def redis_with_worker(tmp_path_factory):
    with RedisServer() as server:
        worker = WorkerProcess(
            server.url, ["grabcut"], name="both-tools", log_dir=str(tmp_path_factory.mktemp("w"))
        )
        try:
            connection = server.client()
            worker.wait_ready(connection)
            yield server, connection
        finally:
            worker.stop(timeout=5)


def test_label_studio_and_cvat_share_one_worker(redis_with_worker, grabcut_dir, monkeypatch):
    server, connection = redis_with_worker
    monkeypatch.setenv("TAPMASK_REDIS_URL", server.url)
    data = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    gt = ground_truth_from_label(cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp")))
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))

    # CVAT: the grabcut function, unchanged, with the Redis URL in its environment.
    env = function_env("grabcut") | {"TAPMASK_REDIS_URL": server.url}
    function = NuclioFunction(env)
    reply = function.call(cvat_payload(data, [[float(col), float(row)]], [], []))
    mask = check_mask_reply(reply, 284, 398)
    assert iou(gt, mask) > 0.5
    assert isinstance(function.user_data.dispatcher, RedisDispatcher)

    # Label Studio: the backend app, also configured by the environment only.
    fake_ls = FakeLabelStudio()
    try:
        fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
        dispatcher = dispatcher_from_env(["grabcut"])
        assert isinstance(dispatcher, RedisDispatcher)
        settings = Settings(
            model="grabcut", label_studio_url=fake_ls.url, api_key=fake_ls.legacy_token
        )
        client = TestClient(create_app(dispatcher, settings, ImageClient(timeout=5)))
        x, y = (col + 0.5) / 284 * 100, (row + 0.5) / 398 * 100
        response = client.post("/predict", json=_predict_body([_keypoint(x, y)], CONFIG))
        assert response.status_code == 200, response.text
        brush = next(
            r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"
        )
        from backends import masks

        assert iou(gt, masks.ls_rle_to_mask(brush["value"]["rle"], 398, 284)) > 0.5
        dispatcher.close()
    finally:
        fake_ls.close()
    # One image stored once in Redis for both tools (same bytes → same sha256 key).
    assert len(list(connection.scan_iter("tapmask:img:*"))) == 1


def test_a_refining_click_carries_its_region_through_the_queue(
    redis_with_worker, grabcut_dir, monkeypatch
):
    """The region a Label Studio click refines travels to the worker as the job's previous mask:
    a lone negative click on it is answered (it would be refused without the region)."""
    from backends import masks
    from backends.evaluation.refine import coarse_mask
    from tests.test_labelstudio import BRUSH_ONLY

    server, _ = redis_with_worker
    monkeypatch.setenv("TAPMASK_REDIS_URL", server.url)
    data = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    gt = ground_truth_from_label(cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp")))
    existing = coarse_mask(gt, "dilate15")
    row, col, positive = next_click(gt, existing)
    assert not positive
    region = {
        "id": "pre1",
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 284,
        "original_height": 398,
        "value": {
            "format": "rle",
            "rle": masks.mask_to_ls_rle(existing),
            "brushlabels": ["Object"],
        },
    }
    url = "/data/upload/1/teddy.jpg"
    fake_ls = FakeLabelStudio()
    dispatcher = dispatcher_from_env(["grabcut"])
    try:
        fake_ls.files[url] = (data, "image/jpeg")
        settings = Settings(
            model="grabcut", label_studio_url=fake_ls.url, api_key=fake_ls.legacy_token
        )
        client = TestClient(create_app(dispatcher, settings, ImageClient(timeout=5)))
        keypoint = _keypoint((col + 0.5) / 284 * 100, (row + 0.5) / 398 * 100, False)
        for predictions, status in (([], 400), ([{"id": 1, "result": [region]}], 200)):
            task = {"id": 7, "data": {"image": url}, "annotations": [], "predictions": predictions}
            body = _predict_body([keypoint], BRUSH_ONLY, url, tasks=[task])
            response = client.post("/predict", json=body)
            assert response.status_code == status, response.text
        [brush] = response.json()["results"][0]["result"]
        mask = masks.ls_rle_to_mask(brush["value"]["rle"], 398, 284)
        assert not mask[row, col] and iou(gt, mask) > iou(gt, existing)
    finally:
        dispatcher.close()
        fake_ls.close()
