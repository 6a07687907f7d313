"""The Label Studio backend over its real HTTP app, with the request shapes Label Studio sends."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle

from backends import images, masks
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.evaluation.clicker import ground_truth_from_label, iou, next_click
from backends.labelstudio.app import Settings, create_app
from backends.labelstudio.client import ImageClient
from backends.models.grabcut import GrabCutSegmenter
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.test_engine import CountingModel

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Object"/><Label value="Other"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Object" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
BRUSH_ONLY = CONFIG.replace(
    '<PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>', ""
)


@pytest.fixture(scope="module")
def teddy(grabcut_dir):
    import cv2

    data = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    gt = ground_truth_from_label(cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp")))
    return data, gt


@pytest.fixture()
def fake_ls():
    server = FakeLabelStudio()
    yield server
    server.close()


def _client(fake_ls, model="grabcut", segmenter=None, **settings) -> TestClient:
    engine = Engine({model: segmenter or GrabCutSegmenter()})
    app = create_app(
        LocalDispatcher(engine),
        Settings(
            model=model,
            label_studio_url=settings.pop("url", fake_ls.url),
            api_key=settings.pop("api_key", fake_ls.legacy_token),
            **settings,
        ),
        ImageClient(timeout=5),
    )
    return TestClient(app)


def _keypoint(x_pct, y_pct, positive=None, w=284, h=398, label="Object"):
    item = {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": x_pct,
            "y": y_pct,
            "width": 0.23,
            "labels": [label],
            "keypointlabels": [label],
        },
        "id": f"kp{x_pct}",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    if positive is not None:
        item["is_positive"] = positive
    return item


def _predict_body(result, config=CONFIG, url="/data/upload/1/teddy.jpg", tasks=None):
    return {
        "tasks": tasks or [{"id": 7, "data": {"image": url}, "annotations": [], "predictions": []}],
        "project": "1.1795267061",
        "label_config": config,
        "params": {
            "login": None,
            "password": None,
            "context": {"result": result} if result is not None else None,
        },
    }


def _object_centre_pct(gt):
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))
    h, w = gt.shape
    return (col + 0.5) / w * 100, (row + 0.5) / h * 100


def test_keypoint_click_returns_brush_and_polygon_over_the_object(fake_ls, teddy):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls)
    x, y = _object_centre_pct(gt)
    response = client.post("/predict", json=_predict_body([_keypoint(x, y)]))  # no is_positive
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == 1
    result = body["results"][0]
    assert result["model_version"].startswith("tapmask-")
    types = sorted(r["type"] for r in result["result"])
    assert types == ["brushlabels", "polygonlabels"]
    brush = next(r for r in result["result"] if r["type"] == "brushlabels")
    assert brush["from_name"] == "brush" and brush["to_name"] == "image"
    assert brush["value"]["brushlabels"] == ["Object"]
    assert (brush["original_width"], brush["original_height"]) == (284, 398)
    rgba = decode_rle(brush["value"]["rle"])  # Label Studio's own decoder
    assert rgba.size == 284 * 398 * 4
    mask = np.reshape(rgba, (398, 284, 4))[:, :, 3]
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255  # visible: 255, not 1
    assert iou(gt, mask > 0) > 0.5
    poly = next(r for r in result["result"] if r["type"] == "polygonlabels")
    pts = np.array(poly["value"]["points"])
    assert poly["value"]["closed"] and (pts >= 0).all() and (pts <= 100).all()
    poly_mask = masks.polygons_to_mask([pts / 100 * [284, 398] - 0.5], 398, 284)
    assert iou(gt, poly_mask) > 0.5
    # stable ids: the same request gives the same region ids
    again = client.post("/predict", json=_predict_body([_keypoint(x, y)])).json()
    assert [r["id"] for r in again["results"][0]["result"]] == [r["id"] for r in result["result"]]


def test_positive_negative_pair_and_brush_only_config(fake_ls, teddy):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls)
    x, y = _object_centre_pct(gt)
    result = [_keypoint(x, y, True), _keypoint(3, 3, False)]
    body = client.post("/predict", json=_predict_body(result, BRUSH_ONLY)).json()
    regions = body["results"][0]["result"]
    assert [r["type"] for r in regions] == ["brushlabels"]
    mask = masks.ls_rle_to_mask(regions[0]["value"]["rle"], 398, 284)
    assert not mask[int(0.03 * 398), int(0.03 * 284)] and iou(gt, mask) > 0.5


def test_rectangles_each_give_an_object(fake_ls, teddy):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls)
    rows, cols = np.nonzero(gt == 1)
    h, w = gt.shape
    box = {
        "x": cols.min() / w * 100 - 2,
        "y": rows.min() / h * 100 - 2,
        "width": (cols.max() - cols.min()) / w * 100 + 4,
        "height": (rows.max() - rows.min()) / h * 100 + 4,
        "rotation": 0,
        "rectanglelabels": ["Object"],
    }
    rect = {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": box,
        "id": "r1",
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
    }
    lower_half = {**box, "y": box["y"] + box["height"] / 2, "height": box["height"] / 2}
    second = {**rect, "id": "r2", "value": lower_half}
    body = client.post("/predict", json=_predict_body([rect, second], BRUSH_ONLY)).json()
    regions = body["results"][0]["result"]
    assert len(regions) == 2 and regions[0]["id"] != regions[1]["id"]
    assert iou(gt, masks.ls_rle_to_mask(regions[0]["value"]["rle"], h, w)) > 0.5


def test_task_open_answers_fast_stores_nothing_and_prefetches(fake_ls, teddy):
    data, _ = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    fake_ls.files["/data/upload/1/b.png"] = (
        images.encode_png(np.zeros((8, 8, 3), np.uint8)),
        "image/png",
    )
    model = CountingModel(encode_seconds=0.5)
    client = _client(fake_ls, model="counting", segmenter=model)
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/teddy.jpg"}},
        {"id": 2, "data": {"image": "/data/upload/1/b.png"}},
    ]
    started = time.perf_counter()
    response = client.post("/predict", json=_predict_body(None, tasks=tasks))
    assert time.perf_counter() - started < 0.5  # does not wait for the encoder
    assert response.status_code == 200 and response.json() == {"results": []}
    deadline = time.time() + 10
    while model.encodes < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert model.encodes == 2
    client.post("/predict", json=_predict_body([_keypoint(50, 50)]))
    assert model.encodes == 2  # the first click found the embedding ready


def test_health_and_setup_answer_while_predict_is_busy(fake_ls, teddy):
    data, _ = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    fake_ls.delay = 2.0  # a slow image download occupies /predict
    client = _client(fake_ls)
    thread = threading.Thread(
        target=lambda: client.post("/predict", json=_predict_body([_keypoint(50, 50)]))
    )
    thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    assert client.get("/health").json()["status"] == "UP"
    setup = client.post(
        "/setup",
        json={"project": "3.123", "schema": CONFIG, "hostname": fake_ls.url, "access_token": "x"},
    )
    assert time.perf_counter() - started < 1.0
    assert setup.json()["model_version"].startswith("tapmask-")
    assert client.get("/versions").json()["versions"] == [setup.json()["model_version"]]
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200
    thread.join()


def test_setup_token_and_hostname_are_used_per_project(fake_ls, teddy):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls, url=None, api_key=None)
    x, y = _object_centre_pct(gt)
    before = client.post("/predict", json=_predict_body([_keypoint(x, y)]))
    assert before.status_code == 502 and "LABEL_STUDIO_URL" in before.json()["detail"]
    client.post(
        "/setup",
        json={
            "project": "1.1795267061",
            "hostname": fake_ls.url,
            "access_token": fake_ls.legacy_token,
            "schema": CONFIG,
        },
    )
    assert client.post("/predict", json=_predict_body([_keypoint(x, y)])).status_code == 200
    other = _predict_body([_keypoint(x, y)])
    other["project"] = "2.1795267999"  # another project: no token pushed for it
    assert client.post("/predict", json=other).status_code == 502


def test_personal_access_token_is_refreshed_into_a_bearer(fake_ls, teddy):
    data, gt = teddy
    fake_ls.legacy_enabled = False
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls, api_key=fake_ls.pat)
    x, y = _object_centre_pct(gt)
    assert client.post("/predict", json=_predict_body([_keypoint(x, y)])).status_code == 200
    assert fake_ls.refreshes == 1
    assert fake_ls.requests[-1][1].startswith("Bearer ")
    legacy = _client(fake_ls)  # legacy tokens disabled: a clear auth error, not a crash
    response = legacy.post("/predict", json=_predict_body([_keypoint(x, y)]))
    assert response.status_code == 502 and "Personal Access Token" in response.json()["detail"]


def test_token_never_reaches_a_foreign_host(fake_ls, teddy):
    data, gt = teddy
    foreign = FakeLabelStudio()
    try:
        foreign.files["/external/teddy.jpg"] = (data, "image/jpeg")
        client = _client(fake_ls)
        x, y = _object_centre_pct(gt)
        body = _predict_body([_keypoint(x, y)], url=f"{foreign.url}/external/teddy.jpg")
        assert client.post("/predict", json=body).status_code == 200
        assert foreign.requests == [("/external/teddy.jpg", None)]
    finally:
        foreign.close()


@pytest.mark.parametrize(
    ("mutate", "status", "needle"),
    [
        (lambda b: b.pop("tasks"), 422, "tasks"),
        (lambda b: b.update(surprise=1), 422, "surprise"),
        (lambda b: b.update(label_config="<View><Image"), 422, "XML"),
        (
            lambda b: b.update(label_config="<View><Image name='image' value='$image'/></View>"),
            422,
            "BrushLabels",
        ),
        (lambda b: b["params"]["context"]["result"][0].update(to_name="nope"), 422, "nope"),
        (lambda b: b["params"]["context"]["result"][0]["value"].update(x=500), 400, "outside"),
        (lambda b: b["params"]["context"]["result"][0]["value"].update(x="NaN"), 422, "number"),
        (lambda b: b["params"]["context"]["result"][0].update(type="choices"), 422, "type"),
        (
            lambda b: b["tasks"][0]["data"].update(image="/data/upload/missing.jpg"),
            404,
            "not found",
        ),
        (
            lambda b: b["tasks"][0]["data"].update(image="/data/upload/page.html"),
            400,
            "not an image",
        ),
        (lambda b: b["tasks"][0]["data"].update(image="s3://bucket/x.jpg"), 400, "scheme"),
        (lambda b: b["tasks"][0].pop("data"), 422, "image URL"),
    ],
)
def test_bad_requests_get_clear_json_errors_and_the_server_keeps_serving(
    fake_ls, teddy, mutate, status, needle
):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    fake_ls.files["/data/upload/page.html"] = (b"<html>login</html>", "text/html")
    client = _client(fake_ls)
    x, y = _object_centre_pct(gt)
    body = _predict_body([_keypoint(x, y)])
    mutate(body)
    response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert needle.lower() in payload["detail"].lower() and payload["error"]
    assert client.post("/predict", json=_predict_body([_keypoint(x, y)])).status_code == 200


def test_malformed_json_and_oversized_download(fake_ls, teddy):
    data, _ = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls)
    response = client.post(
        "/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["detail"]
    assert response.json()["error"] == "bad_request"  # the same code and status as CVAT's
    client.app.state.image_client.max_bytes = 1000
    response = client.post("/predict", json=_predict_body([_keypoint(50, 50)]))
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_basic_auth(fake_ls):
    client = _client(fake_ls, basic_auth_user="ls", basic_auth_pass="s3cret")
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/health", auth=("ls", "s3cret")).status_code == 200


def test_metrics_report_requests_and_cache_hits(fake_ls, teddy):
    data, gt = teddy
    fake_ls.files["/data/upload/1/teddy.jpg"] = (data, "image/jpeg")
    client = _client(fake_ls)
    x, y = _object_centre_pct(gt)
    client.post("/predict", json=_predict_body([_keypoint(x, y)]))
    client.post("/predict", json=_predict_body([_keypoint(x, y)]))
    text = client.get("/metrics").text
    assert 'tapmask_requests_total{endpoint="/predict",status="200"} 2.0' in text
    assert 'tapmask_cache_hits_total{cache="image-downloads"} 1.0' in text
    assert "tapmask_request_seconds_bucket" in text


def test_oversized_request_body_is_refused_before_it_is_read(fake_ls):
    client = _client(fake_ls, max_request_bytes=1000)
    response = client.post(
        "/predict", content=b"x" * 2000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    assert client.get("/health").status_code == 200
