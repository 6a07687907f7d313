"""Hostile and malformed requests against the real Label Studio backend (issue 14).

One ``tapmask serve labelstudio`` process (GrabCut) serves the whole module over HTTP, so the
timings are a real server's and the memory is its resident set. Each refusal must come fast with
its own status and code, and the server must still serve a click afterwards. Budgets are checked
on the request alone (the process is started once, outside them).
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backends import images, masks
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.evaluation.clicker import ground_truth_from_label, iou
from backends.labelstudio.app import Settings, create_app
from backends.models.grabcut import GrabCutSegmenter
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.support.servers import BackendProcess, MisbehavingImageHost
from tests.test_engine import CountingModel
from tests.test_labelstudio import _keypoint, _object_centre_pct, _predict_body

BUDGET_S = 2.0
READ_TIMEOUT_S = 1.0
DEADLINE_S = 3.0
MB = 2**20
TEDDY = "/data/upload/1/teddy.jpg"
ONE_BRUSH_LABEL = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Ghost"/></KeyPointLabels>
</View>"""
TWO_BRUSH_LABELS = ONE_BRUSH_LABEL.replace(
    '<Label value="Object"/>', '<Label value="Object"/><Label value="Other"/>'
)


class Teddy:
    def __init__(self, grabcut_dir):
        self.file = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
        label = cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp"))
        self.gt = ground_truth_from_label(label)
        self.height, self.width = self.gt.shape
        self.x, self.y = _object_centre_pct(self.gt)


@pytest.fixture(scope="module")
def teddy(grabcut_dir):
    return Teddy(grabcut_dir)


@pytest.fixture(scope="module")
def hosts(teddy):
    fake, bad = FakeLabelStudio(), MisbehavingImageHost()
    fake.files[TEDDY] = (teddy.file, "image/jpeg")
    fake.files["/data/upload/page.html"] = (b"<html>login</html>", "text/html")
    fake.files["/data/upload/text.bin"] = (b"not an image at all", "application/octet-stream")
    yield fake, bad
    bad.close()
    fake.close()


@pytest.fixture(scope="module")
def backend(hosts, tmp_path_factory):
    fake, _ = hosts
    server = BackendProcess(
        {
            "TAPMASK_MODEL": "grabcut",
            "LABEL_STUDIO_URL": fake.url,
            "LABEL_STUDIO_API_KEY": fake.legacy_token,
            "TAPMASK_DOWNLOAD_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "TAPMASK_DOWNLOAD_DEADLINE_S": str(DEADLINE_S),
        },
        tmp_path_factory.mktemp("backend") / "backend.log",
    )
    yield server
    server.close()


def _post(backend: BackendProcess, body: Any = None, *, content: bytes | None = None):
    started = time.perf_counter()
    if content is None:
        response = backend.http.post("/predict", json=body)
    else:
        response = backend.http.post(
            "/predict", content=content, headers={"content-type": "application/json"}
        )
    return response, time.perf_counter() - started


def _refused(response, seconds: float, status: int, code: str, budget: float = BUDGET_S):
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert seconds < budget, f"answered in {seconds:.2f} s, budget {budget} s"
    return body["detail"]


def _serves_a_click(backend: BackendProcess, teddy: Teddy) -> None:
    response, _ = _post(backend, _predict_body([_keypoint(teddy.x, teddy.y)]))
    assert response.status_code == 200, response.text[:500]
    brush = next(r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels")
    mask = masks.ls_rle_to_mask(brush["value"]["rle"], teddy.height, teddy.width)
    assert iou(teddy.gt, mask) > 0.5


def _rectangle(index: int) -> dict[str, Any]:
    return {
        "original_width": 284,
        "original_height": 398,
        "image_rotation": 0,
        "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["Object"]},
        "id": f"r{index}",
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
    }


# --------------------------------------------------------------------------------------------
# The rows, one test each


def test_a_declared_size_over_the_pixel_limit_is_refused_at_once_in_little_memory(backend, teddy):
    _serves_a_click(backend, teddy)  # warm: the idle figure includes a served click
    time.sleep(0.2)
    idle = backend.rss()
    exact_peak = backend.reset_peak_rss()
    body = _predict_body([_keypoint(teddy.x, teddy.y, w=100_000, h=100_000)])
    response, seconds = _post(backend, body)
    detail = _refused(response, seconds, 413, "declared_size_too_large")
    assert "original_width" in detail and "TAPMASK_MAX_PIXELS" in detail
    grown = backend.peak_rss() - idle
    if exact_peak:  # VmHWM was reset just before: the request's own peak
        assert grown < 200 * MB, f"peak {grown / MB:.0f} MB above idle"
    assert backend.rss() - idle < 200 * MB
    _serves_a_click(backend, teddy)


def test_too_many_objects_are_refused_before_any_image_is_fetched(backend, hosts, teddy):
    fake, _ = hosts
    fetched = len(fake.requests)
    body = _predict_body([_rectangle(i) for i in range(2000)], url="/data/upload/1/fresh.jpg")
    response, seconds = _post(backend, body)
    detail = _refused(response, seconds, 413, "too_many_objects")
    assert "2000" in detail and "TAPMASK_MAX_OBJECTS" in detail
    assert len(fake.requests) == fetched
    keypoints = [_keypoint(teddy.x, teddy.y + i * 0.01) for i in range(101)]
    response, seconds = _post(backend, _predict_body(keypoints))
    _refused(response, seconds, 413, "too_many_clicks")
    _serves_a_click(backend, teddy)


@pytest.mark.parametrize(
    ("path", "budget"),
    [("/stall", READ_TIMEOUT_S + 1.0), ("/trickle", DEADLINE_S + 1.0)],
    ids=["stalls-after-100-bytes", "trickles-a-byte-every-200-ms"],
)
def test_an_image_host_that_stalls_ends_in_image_timeout(backend, hosts, teddy, path, budget):
    _, bad = hosts
    body = _predict_body([_keypoint(50, 50)], url=f"{bad.url}{path}")
    response, seconds = _post(backend, body)
    detail = _refused(response, seconds, 504, "image_timeout", budget=budget)
    assert ("TAPMASK_DOWNLOAD_READ_TIMEOUT_S" if path == "/stall" else "DEADLINE") in detail
    if path == "/trickle":
        assert seconds > DEADLINE_S - 0.5  # the deadline ended it, not a read timeout
    _serves_a_click(backend, teddy)


def _nested(depth: int) -> bytes:
    return b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"


def _huge_integer_coordinate(teddy: Teddy) -> bytes:
    text = json.dumps(_predict_body([_keypoint(12345, teddy.y)]))
    return text.replace("12345", "1" * 5000, 1).encode()


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda t: _predict_body([_keypoint(t.x, t.y)], url="http://[::1"), 400, "bad_image_url"),
        (
            lambda t: _predict_body([_keypoint(t.x, t.y)], url="/data/" + "a" * 100_000),
            414,
            "image_url_too_long",
        ),
        (lambda t: _predict_body([_keypoint(t.x, t.y)], url="/data/a\0.jpg"), 400, "bad_image_url"),
        (
            lambda t: _predict_body([_keypoint(t.x, t.y)], url="/data/a.jpg\r\nX-Evil: 1"),
            400,
            "bad_image_url",
        ),
        (_huge_integer_coordinate, 413, "number_too_long"),
        (lambda t: _nested(100_000), 413, "json_too_deep"),
    ],
    ids=["unclosed-ipv6", "100-kb-url", "nul", "crlf", "5000-digit-integer", "nested-100000"],
)
def test_malformed_urls_numbers_and_nesting_get_a_named_4xx(backend, teddy, make, status, code):
    made = make(teddy)
    if isinstance(made, bytes):
        response, seconds = _post(backend, content=made)
    else:
        response, seconds = _post(backend, made)
    _refused(response, seconds, status, code)
    _serves_a_click(backend, teddy)


def test_a_label_the_output_control_does_not_define_is_never_emitted(backend, teddy):
    ghost = _keypoint(teddy.x, teddy.y, label="Ghost")
    response, seconds = _post(backend, _predict_body([ghost], config=ONE_BRUSH_LABEL))
    assert response.status_code == 200, response.text[:300]
    regions = response.json()["results"][0]["result"]
    assert [r["value"]["brushlabels"] for r in regions] == [["Object"]]  # its only label
    assert "label 'Ghost' is not defined by BrushLabels 'brush'" in backend.log()
    response, seconds = _post(backend, _predict_body([ghost], config=TWO_BRUSH_LABELS))
    detail = _refused(response, seconds, 422, "unknown_label")
    assert "'Ghost'" in detail and "Object, Other" in detail
    _serves_a_click(backend, teddy)


# --------------------------------------------------------------------------------------------
# Declared size vs decoded size


def _exif_rotated(teddy: Teddy) -> bytes:
    """Teddy stored sideways with EXIF orientation 6: decodes (and displays) upright."""
    upright = np.asarray(Image.open(io.BytesIO(teddy.file)).convert("RGB"))
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    assert images.size(data) == (teddy.height, teddy.width)
    return data


def _brush(response, width: int, height: int) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    brush = next(r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels")
    assert (brush["original_width"], brush["original_height"]) == (width, height)
    return masks.ls_rle_to_mask(brush["value"]["rle"], height, width)


def test_a_scaled_copy_is_drawn_at_the_declared_size(backend, teddy):
    width, height = teddy.width // 2, teddy.height // 2
    body = _predict_body([_keypoint(teddy.x, teddy.y, w=width, h=height)])
    mask = _brush(_post(backend, body)[0], width, height)
    small_gt = cv2.resize(teddy.gt.astype(np.uint8), (width, height), cv2.INTER_NEAREST) > 0
    assert iou(small_gt, mask) > 0.5


def test_the_stored_frame_of_an_exif_rotated_image_is_mapped_through_its_orientation(
    backend, hosts, teddy
):
    fake, _ = hosts
    fake.files["/data/upload/1/sideways.jpg"] = (_exif_rotated(teddy), "image/jpeg")
    url = "/data/upload/1/sideways.jpg"
    # A browser that applies the rotation declares the upright size: plain percent.
    upright = _predict_body([_keypoint(teddy.x, teddy.y)], url=url)
    assert iou(teddy.gt, _brush(_post(backend, upright)[0], teddy.width, teddy.height)) > 0.5
    # One that shows the stored pixels declares the stored frame (sides swapped) and clicks in
    # it: stored = upright rotated 90° counter-clockwise, so upright (x, y) is stored (y, W - x).
    stored_x, stored_y = teddy.y, 100.0 - teddy.x
    sideways = _keypoint(stored_x, stored_y, w=teddy.height, h=teddy.width)
    mask = _brush(_post(backend, _predict_body([sideways], url=url))[0], teddy.height, teddy.width)
    assert iou(np.rot90(teddy.gt, k=1), mask) > 0.5


def test_a_declared_size_that_cannot_be_the_image_is_refused(backend, teddy):
    body = _predict_body([_keypoint(teddy.x, teddy.y, w=398, h=284)])  # swapped, no EXIF
    response, seconds = _post(backend, body)
    detail = _refused(response, seconds, 422, "declared_size_mismatch")
    assert "398×284" in detail and "284×398" in detail
    response, seconds = _post(backend, _predict_body([_keypoint(50, 50, w=300, h=300)]))
    _refused(response, seconds, 422, "declared_size_mismatch")


# --------------------------------------------------------------------------------------------
# The table: no body a client controls gets a 500


def _with(change):
    """A valid body for teddy, changed by ``change(body, keypoint_item)``."""

    def make(teddy: Teddy) -> dict[str, Any]:
        body = _predict_body([_keypoint(teddy.x, teddy.y)])
        change(body, body["params"]["context"]["result"][0])
        return body

    return make


def _raw(data: bytes):
    return lambda teddy: data


def _keypoint_text(teddy: Teddy, x: str) -> bytes:
    text = json.dumps(_predict_body([_keypoint(12345, teddy.y)]))
    return text.replace("12345", x, 1).encode()


def _set(path: str, value: Any):
    """``_with`` a change at ``path`` (dotted; ``kp.`` = the keypoint, ``task.`` = the task)."""

    def change(body: dict[str, Any], keypoint: dict[str, Any]) -> None:
        head, *rest = path.split(".")
        node: Any = {"kp": keypoint, "task": body["tasks"][0], "body": body}[head]
        for key in rest[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[rest[-1]]
        else:
            node[rest[-1]] = value

    return _with(change)


_DELETE = object()


def _ghost(body: dict[str, Any], keypoint: dict[str, Any]) -> None:
    body["label_config"] = TWO_BRUSH_LABELS
    keypoint["value"]["keypointlabels"] = ["Ghost"]


MALFORMED = [
    ("not-json", _raw(b"{tasks: nope"), 400, "bad_request"),
    ("invalid-utf8", _raw(b'{"tasks": "\xff\xfe"}'), 400, "bad_request"),
    ("json-array", _raw(b"[1, 2, 3]"), 422, "invalid_request"),
    ("json-string", _raw(b'"predict"'), 422, "invalid_request"),
    ("json-null", _raw(b"null"), 422, "invalid_request"),
    ("tasks-missing", _set("body.tasks", _DELETE), 422, "invalid_request"),
    ("tasks-empty", _set("body.tasks", []), 422, "invalid_request"),
    ("tasks-not-a-list", _set("body.tasks", "all"), 422, "invalid_request"),
    ("task-not-an-object", _set("body.tasks", [7]), 422, "invalid_request"),
    ("unknown-field", _set("body.surprise", 1), 422, "invalid_request"),
    ("params-not-an-object", _set("body.params", [1]), 422, "invalid_request"),
    ("label-config-missing", _set("body.label_config", None), 422, "bad_label_config"),
    ("label-config-not-xml", _set("body.label_config", "<View><Image"), 422, "bad_label_config"),
    (
        "label-config-entity-bomb",
        _set("body.label_config", '<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>'),
        422,
        "bad_label_config",
    ),
    (
        "no-output-control",
        _set("body.label_config", "<View><Image name='image' value='$image'/></View>"),
        422,
        "bad_label_config",
    ),
    ("task-data-missing", _set("task.data", _DELETE), 422, "invalid_request"),
    ("image-url-not-a-string", _set("task.data", {"image": 7}), 422, "invalid_request"),
    (
        "result-not-a-list",
        _set("body.params", {"context": {"result": {"a": 1}}}),
        422,
        "invalid_request",
    ),
    (
        "region-not-an-object",
        _set("body.params", {"context": {"result": [5]}}),
        422,
        "invalid_request",
    ),
    ("region-type-choices", _set("kp.type", "choices"), 422, "invalid_request"),
    ("region-value-not-an-object", _set("kp.value", [1, 2]), 422, "invalid_request"),
    ("to-name-missing", _set("kp.to_name", _DELETE), 422, "invalid_request"),
    ("to-name-unknown", _set("kp.to_name", "nope"), 422, "bad_label_config"),
    ("x-missing", _set("kp.value.x", _DELETE), 422, "invalid_request"),
    ("x-a-string", _set("kp.value.x", "50"), 422, "invalid_request"),
    ("x-a-boolean", _set("kp.value.x", True), 422, "invalid_request"),
    ("x-nan-literal", lambda t: _keypoint_text(t, "NaN"), 422, "invalid_request"),
    ("x-infinity-literal", lambda t: _keypoint_text(t, "-Infinity"), 422, "invalid_request"),
    ("x-overflows-to-infinity", lambda t: _keypoint_text(t, "1e999"), 422, "invalid_request"),
    ("x-100-digit-integer", lambda t: _keypoint_text(t, "9" * 100), 400, "bad_prompt"),
    ("x-far-outside", _set("kp.value.x", 500), 400, "bad_prompt"),
    ("original-width-negative", _set("kp.original_width", -284), 422, "invalid_request"),
    ("original-width-a-string", _set("kp.original_width", "284"), 422, "invalid_request"),
    ("original-width-1e300", _set("kp.original_width", 1e300), 413, "declared_size_too_large"),
    ("original-size-mismatch", _set("kp.original_height", 5), 422, "declared_size_mismatch"),
    ("label-unknown", _with(_ghost), 422, "unknown_label"),
    ("url-ftp", _set("task.data", {"image": "ftp://host/a.jpg"}), 400, "bad_image_url"),
    ("url-no-host", _set("task.data", {"image": "http:///a.jpg"}), 400, "bad_image_url"),
    ("url-bad-port", _set("task.data", {"image": "http://host:99999/a.jpg"}), 400, "bad_image_url"),
    ("url-tab", _set("task.data", {"image": "/data/a\t.jpg"}), 400, "bad_image_url"),
    ("data-uri-not-base64", _set("task.data", {"image": "data:image/png,abc"}), 400, "bad_image"),
    (
        "data-uri-bad-base64",
        _set("task.data", {"image": "data:image/png;base64,@@@"}),
        400,
        "bad_image",
    ),
    ("image-404", _set("task.data", {"image": "/data/upload/missing.jpg"}), 404, "image_not_found"),
    ("image-is-html", _set("task.data", {"image": "/data/upload/page.html"}), 400, "bad_image"),
    ("image-not-an-image", _set("task.data", {"image": "/data/upload/text.bin"}), 400, "bad_image"),
    ("nested-65", lambda t: _nested(65), 413, "json_too_deep"),
    ("101-digit-integer", lambda t: b'{"tasks": [' + b"7" * 101 + b"]}", 413, "number_too_long"),
]


@pytest.mark.parametrize(
    ("name", "make", "status", "code"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_bodies_get_a_4xx_with_their_code(backend, teddy, name, make, status, code):
    made = make(teddy)
    if isinstance(made, bytes):
        response, seconds = _post(backend, content=made)
    else:
        response, seconds = _post(backend, made)
    _refused(response, seconds, status, code)


def test_the_table_is_long_enough_and_the_server_serves_after_it(backend, teddy):
    assert len(MALFORMED) >= 30
    _serves_a_click(backend, teddy)


@pytest.mark.parametrize(
    ("endpoint", "content", "status", "code"),
    [
        ("/setup", b"[1]", 422, "invalid_request"),
        ("/setup", b'{"hostname": 7}', 422, "invalid_request"),
        ("/setup", b'{"hostname": "http://[::1"}', 400, "bad_image_url"),
        ("/setup", b'{"access_token": "a\\r\\nb"}', 422, "invalid_request"),
        ("/setup", b"{nope", 400, "bad_request"),
        ("/webhook", b"[" * 1000 + b"]" * 1000, 413, "json_too_deep"),
    ],
)
def test_other_endpoints_refuse_malformed_bodies(backend, endpoint, content, status, code):
    started = time.perf_counter()
    response = backend.http.post(
        endpoint, content=content, headers={"content-type": "application/json"}
    )
    _refused(response, time.perf_counter() - started, status, code)


def test_a_chunked_body_over_the_byte_limit_is_refused_while_it_is_read(hosts):
    fake, _ = hosts
    app = create_app(
        LocalDispatcher(Engine({"grabcut": GrabCutSegmenter()})),
        Settings(label_studio_url=fake.url, max_request_bytes=100_000),
    )
    sent = []

    def chunks():  # no Content-Length: the middleware cannot see the size in advance
        yield b'{"tasks": ["'
        for _ in range(100):
            sent.append(1)
            yield b"a" * 10_000

    with TestClient(app) as client:
        response = client.post(
            "/predict", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413 and response.json()["error"] == "request_too_large"
    assert "TAPMASK_MAX_REQUEST_MB" in response.json()["detail"]


def test_task_open_prefetches_at_most_the_queue_bound(hosts, caplog):
    fake, _ = hosts
    tasks = []
    for i in range(4):
        fake.files[f"/data/upload/q{i}.png"] = (
            images.encode_png(np.full((8, 8, 3), 40 * i, np.uint8)),
            "image/png",
        )
        tasks.append({"id": i, "data": {"image": f"/data/upload/q{i}.png"}})
    model = CountingModel(encode_seconds=0.5)
    app = create_app(
        LocalDispatcher(Engine({"counting": model})),
        Settings(
            model="counting",
            label_studio_url=fake.url,
            api_key=fake.legacy_token,
            prefetch_queue=2,
        ),
    )
    with caplog.at_level(logging.INFO, "tapmask.labelstudio"), TestClient(app) as client:
        response = client.post("/predict", json=_predict_body(None, tasks=tasks))
        assert response.json() == {"results": []}
        deadline = time.monotonic() + 10
        while model.encodes < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.8)  # longer than an encode: two more prefetches would have finished
    assert model.encodes == 2
    skipped = [r for r in caplog.records if "TAPMASK_PREFETCH_QUEUE" in r.getMessage()]
    assert len(skipped) == 2
