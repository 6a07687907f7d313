"""CVAT tracker functions through the real nuclio handler: CVAT-shaped frames with shapes and
states (null, expired, forged, missing), rectangles and polygons, as CVAT's UI sends them."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import yaml

from backends.masks import largest_polygon, mask_bbox, polygons_to_mask
from backends.video.synthetic import build_clip, iou
from serverless.functions import FUNCTIONS
from tests.support.cvat_harness import (
    SERVERLESS,
    NuclioFunction,
    check_error_reply,
    function_env,
)
from tests.test_cvat_functions import check_listing, cvat_lambda_function

TRACKERS = [f for f in FUNCTIONS if f.kind == "tracker"]


@pytest.fixture(scope="module")
def clip(grabcut_dir):
    return build_clip(grabcut_dir, objects=2, frames=20, width=320, height=180, seed=3)


@pytest.fixture(scope="module")
def flow():
    return NuclioFunction(function_env("flow-tracker"))


def _frame(clip, index: int) -> str:
    return base64.b64encode(clip.encoded(index)).decode("ascii")


def _box(mask) -> list[float]:
    return [float(v) for v in mask_bbox(mask)]


def _box_iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1) + 1)
    ih = max(0.0, min(ay2, by2) - max(ay1, by1) + 1)
    inter = iw * ih
    area = (ax2 - ax1 + 1) * (ay2 - ay1 + 1) + (bx2 - bx1 + 1) * (by2 - by1 + 1) - inter
    return inter / area


@pytest.mark.parametrize("function", TRACKERS, ids=lambda f: f.folder)
def test_tracker_functions_pass_cvats_listing_rules(function):
    for variant in function.variants:
        path = SERVERLESS / function.folder / "nuclio" / variant.yaml
        config = yaml.safe_load(path.read_text())
        check_listing(config)
        assert cvat_lambda_function(config)["kind"] == "tracker"
        annotations = config["metadata"]["annotations"]
        assert annotations["supported_shape_types"] == "rectangle, polygon"
        assert "min_pos_points" not in annotations


def test_rectangles_the_legacy_way(flow, clip):
    """Old UIs: bare [x1, y1, x2, y2] shapes, ``states: []`` on the initialising call (the
    server drops a missing field to []), then every frame with the previous states."""
    _, truth = clip.frame(0)
    shapes = [_box(m) for m in truth]
    init = flow.call({"image": _frame(clip, 0), "shapes": shapes, "states": []})
    assert init.status == 200, init.text
    body = init.json
    assert body["shapes"] == shapes  # the box as drawn on the first frame
    states = body["states"]
    assert len(states) == 2 and all(isinstance(s["h"], str) and len(s["h"]) < 64 for s in states)
    for index in range(1, 10):
        reply = flow.call({"image": _frame(clip, index), "shapes": shapes, "states": states})
        assert reply.status == 200, reply.text
        shapes, states = reply.json["shapes"], reply.json["states"]
        assert all(isinstance(s, list) and len(s) == 4 for s in shapes)
    _, truth = clip.frame(9)
    overlaps = [_box_iou(s, _box(m)) for s, m in zip(shapes, truth, strict=True)]
    assert min(overlaps) > 0.5, overlaps
    assert max(len(str(s)) for s in states) < 200  # small JSON handles


def test_polygons_with_typed_shapes(flow, clip):
    _, truth = clip.frame(0)
    shapes = [
        {"type": "polygon", "points": [v for p in largest_polygon(m) for v in p]} for m in truth
    ]
    reply = flow.call({"image": _frame(clip, 0), "shapes": shapes, "states": [None, None]})
    assert reply.status == 200, reply.text
    states = reply.json["states"]
    for index in range(1, 8):
        reply = flow.call({"image": _frame(clip, index), "shapes": shapes, "states": states})
        assert reply.status == 200, reply.text
        shapes, states = reply.json["shapes"], reply.json["states"]
    _, truth = clip.frame(7)
    for shape, mask in zip(shapes, truth, strict=True):
        assert shape["type"] == "polygon"
        points = np.asarray(shape["points"], float).reshape(-1, 2)
        assert iou(polygons_to_mask([points], *mask.shape), mask) > 0.6


def test_states_without_shapes_track_from_the_state(flow, clip):
    _, truth = clip.frame(0)
    shapes = [{"type": "rectangle", "points": _box(truth[0])}]
    states = flow.call({"image": _frame(clip, 0), "shapes": shapes}).json["states"]
    reply = flow.call({"image": _frame(clip, 1), "states": states})
    assert reply.status == 200, reply.text
    assert reply.json["shapes"][0]["type"] == "rectangle"
    engine = flow.engine
    stepped = engine.tracking.stats.stepped
    flow.call({"image": _frame(clip, 2), "states": reply.json["states"]})
    assert engine.tracking.stats.stepped == stepped + 1


@pytest.mark.parametrize(
    "state",
    [
        {"h": "A" * 24, "s": [1, 1, 5, 5]},  # well formed, expired or never issued here
        {"h": "../../../etc/passwd"},  # forged
        {"h": "A" * 5000},  # too long
        {"h": 12345},
        "a string instead of an object",
        [1, 2, 3],
    ],
    ids=["expired", "forged-path", "too-long", "number", "string", "list"],
)
def test_unusable_states_reinitialise_from_the_shape(flow, clip, state):
    _, truth = clip.frame(4)
    box = _box(truth[0])
    refused = flow.engine.tracking.stats.started
    reply = flow.call({"image": _frame(clip, 4), "shapes": [box], "states": [state]})
    assert reply.status == 200, reply.text
    assert reply.json["shapes"] == [box]  # initialised on this frame from the shape sent
    assert flow.engine.tracking.stats.started == refused + 1
    assert reply.json["states"][0]["h"] != state


def test_bad_tracker_requests_answer_4xx(flow, clip, monkeypatch):
    image = _frame(clip, 0)
    cases = [
        ({"image": image, "shapes": [{"type": "mask", "points": [1, 2, 3]}]}, 400),
        ({"image": image, "shapes": [[1, 2, 3]]}, 400),
        ({"image": image, "shapes": []}, 400),
        ({"image": image, "shapes": "x"}, 400),
        ({"image": image, "states": [None]}, 400),
        ({"image": image, "shapes": [[1, 1, 9, 9]] * 40}, 413),
        ({"image": image, "shapes": [{"type": "polygon", "points": [1.0] * 30000}]}, 413),
        ({"shapes": [[1, 1, 9, 9]]}, 400),
        ({"image": image, "shapes": [[1, 1, 9000, 9]]}, 400),
    ]
    for payload, status in cases:
        check_error_reply(flow.call(payload), status)


def test_the_sam2_tracker_function_runs_a_tiny_video_model(clip, tmp_path):
    """The SAM 2.1 tracker function's own environment, its folder pointed at a tiny model."""
    from tests.test_video_models import _make_sam2

    env = function_env("sam2-tracker")
    env["SAM2_MODEL_DIR"] = str(_make_sam2(tmp_path / "sam2-video"))
    env["TAPMASK_MODEL_OPTIONS"] = '{"check_variant": false}'
    function = NuclioFunction(env)
    _, truth = clip.frame(0)
    shapes = [{"type": "rectangle", "points": _box(truth[0])}]
    reply = function.call({"image": _frame(clip, 0), "shapes": shapes, "states": [None]})
    assert reply.status == 200, reply.text
    assert reply.json["shapes"] == shapes
    for index in (1, 2):
        reply = function.call({"image": _frame(clip, index), "states": reply.json["states"]})
        assert reply.status == 200, reply.text
        shape = reply.json["shapes"][0]
        assert shape["type"] == "rectangle" and len(shape["points"]) == 4
    assert function.engine.tracking.stats.stepped == 2
