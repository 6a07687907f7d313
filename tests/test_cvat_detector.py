"""The CVAT detector function (``serverless/grounding-sam2``) through the real nuclio handler: a
tiny random Grounding DINO in front of GrabCut, replies read the way CVAT's ``_call_detector``
reads them (``backends/cvat/detector.py`` cites the source)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from backends import images, masks
from backends.cvat import detector
from backends.errors import ModelLoadError
from tests.support.cvat_harness import NuclioFunction, check_error_reply, function_env
from tests.support.preannotate_models import tiny_detector_dir

LABELS = [{"name": "car", "type": "mask"}, {"name": "person", "type": "polygon"}]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return tiny_detector_dir(tmp_path_factory.mktemp("models") / "grounding-dino")


@pytest.fixture(scope="module")
def function(detector_dir):
    env = function_env("grounding-sam2")
    assert env["TAPMASK_CVAT_MODE"] == "detector"
    env.update(
        TAPMASK_MODEL="grabcut",  # weights-free segmenter behind the detector
        TAPMASK_DETECTOR="test-grounding-dino",
        TAPMASK_PLUGINS="tests.support.preannotate_models",
        TAPMASK_TEST_DETECTOR_DIR=str(detector_dir),
        TAPMASK_DEVICE="cpu",
        TAPMASK_DETECTOR_LABELS=json.dumps(LABELS),
        TAPMASK_BOX_THRESHOLD="0",  # random weights: keep every box
        TAPMASK_TEXT_THRESHOLD="0",
    )
    return NuclioFunction(env)


@pytest.fixture(scope="module")
def teddy(grabcut_dir) -> bytes:
    return (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()


def _payload(image: bytes, **extra) -> dict:
    """What CVAT's ``LambdaFunction.invoke`` posts to a detector."""
    return {"image": base64.b64encode(image).decode(), **extra}


def _cvat_shape(item: dict, width: int, height: int, labels: dict[str, str]) -> np.ndarray | None:
    """``_call_detector.parse_anno`` for one item; the stored mask (None for a polygon)."""
    assert item["label"] in labels
    assert 0.0 <= float(item["confidence"]) <= 1.0
    points = item.get("points")
    if points is not None:
        assert len(points) >= 6 and len(points) % 2 == 0, "flat [x1, y1, x2, y2, …]"
        xy = np.asarray(points, float).reshape(-1, 2)
        assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    if item["type"] == "polygon":
        assert labels[item["label"]] == "polygon" and "mask" not in item and points
        return None
    assert item["type"] == "mask" and labels[item["label"]] == "mask"
    values = item["mask"]
    x1, y1, x2, y2 = values[-4:]
    cut = np.asarray(values[:-4])
    assert set(np.unique(cut)) <= {0, 1} and cut.size == (y2 - y1 + 1) * (x2 - x1 + 1)
    # datumaro's mask_to_rle on the flat list, then CVAT's [runs…, bounds] as it stores them.
    change = np.flatnonzero(np.diff(cut)) + 1
    runs = np.diff(np.concatenate([[0], change, [cut.size]])).tolist()
    if cut[0]:
        runs.insert(0, 0)
    return masks.cvat_rle_to_mask([*runs, x1, y1, x2, y2], height, width)


def test_every_box_comes_back_as_a_cvat_mask_or_polygon(function, teddy):
    reply = function.call(_payload(teddy))
    assert reply.status == 200, reply.text[:300]
    items = reply.json
    assert isinstance(items, list) and items, "random weights and threshold 0 find boxes"
    height, width = images.size(teddy)
    kinds = {label["name"]: label["type"] for label in LABELS}
    stored = [_cvat_shape(item, width, height, kinds) for item in items]
    assert {item["type"] for item in items} <= {"mask", "polygon"}

    # The same instances the pipeline makes, in its order (best score first).
    config = function.user_data.detector_config
    request = detector.DetectorRequest(teddy)
    instances = detector.detect(
        function.user_data.dispatcher, "grabcut", "test-grounding-dino", config, request
    )
    kept = [
        i for i in instances if kinds[i.label] == "mask" or len(masks.largest_polygon(i.mask)) >= 3
    ]
    assert [item["label"] for item in items] == [i.label for i in kept]
    scores = [float(item["confidence"]) for item in items]
    assert scores == sorted(scores, reverse=True)
    for item, instance, mask in zip(items, kept, stored, strict=True):
        if mask is not None:
            np.testing.assert_array_equal(mask, instance.mask)
        if mask is not None and "points" in item:  # left out when the object is too thin
            # points: the outline CVAT stores when the user converts masks to polygons
            xy = np.asarray(item["points"]).reshape(-1, 2)
            assert instance.mask[xy[:, 1], xy[:, 0]].mean() > 0.9
    assert any("points" in item for item in items)


def test_the_request_threshold_replaces_the_box_threshold(function, teddy):
    everything = function.call(_payload(teddy)).json
    reply = function.call(_payload(teddy, threshold=0.999))
    assert reply.status == 200 and isinstance(reply.json, list)
    assert len(reply.json) < len(everything)


@pytest.mark.parametrize(
    "payload, status",
    [({}, 400), ({"image": 7}, 400), ({"image": "bm90IGFuIGltYWdl"}, None)],
    ids=["no-image", "image-not-text", "not-an-image"],
)
def test_bad_requests_answer_json_errors(function, teddy, payload, status):
    check_error_reply(function.call(payload), status)
    bad_threshold = function.call(_payload(teddy, threshold="high"))
    check_error_reply(bad_threshold, 400)


def test_the_detector_mask_encoding_is_the_crop_flat_then_bounds():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    mask[2, 3] = False
    values = json.loads(masks.mask_to_cvat_detector_json(mask))
    assert values[-4:] == [2, 1, 6, 3]
    crop = json.loads(masks.mask_to_cvat_crop_json(mask))["mask"]  # the interactor's rows
    assert values[:-4] == [v for row in crop for v in row]
    with pytest.raises(ValueError):
        masks.mask_to_cvat_detector_json(np.zeros((3, 3), bool))


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[]",
        '[{"name": "car", "type": "rectangle"}]',
        '[{"name": ""}]',
        '[{"name": "car"}, {"name": "car", "type": "polygon"}]',
    ],
)
def test_unusable_labels_fail_the_deploy(raw):
    with pytest.raises(ModelLoadError):
        detector.config_from_env({detector.ENV_LABELS: raw})


def test_labels_default_to_masks_and_round_trip():
    labels = detector.parse_labels('[{"name": "car"}, {"name": "person", "type": "polygon"}]')
    assert labels == (detector.DetectorLabel("car"), detector.DetectorLabel("person", "polygon"))
    assert detector.parse_labels(detector.labels_json(labels)) == labels


def test_reply_items_per_label_type():
    """A mask label gets the crop and, when the object has an outline, its polygon; a polygon
    label gets the polygon only, and an object too thin for one is left out."""
    from backends.preannotate import Instance
    from backends.prompts import Box

    square = np.zeros((20, 30), bool)
    square[5:15, 10:25] = True
    dot = np.zeros((20, 30), bool)
    dot[3, 3] = True
    config = detector.DetectorConfig(detector.parse_labels(json.dumps(LABELS)), {}, None)
    found = [
        Instance("car", square, 0.9, Box(10, 5, 24, 14)),
        Instance("person", square, 0.8, Box(10, 5, 24, 14)),
        Instance("car", dot, 0.7, Box(3, 3, 3, 3)),
        Instance("person", dot, 0.6, Box(3, 3, 3, 3)),
    ]
    items = json.loads(detector.detector_reply(found, config))
    assert [(i["label"], i["type"]) for i in items] == [
        ("car", "mask"),
        ("person", "polygon"),
        ("car", "mask"),
    ]
    assert items[0]["confidence"] == "0.9000"
    assert items[0]["points"] == items[1]["points"]
    xy = np.asarray(items[0]["points"]).reshape(-1, 2)
    assert xy[:, 0].min() == 10 and xy[:, 0].max() == 24 and xy[:, 1].min() == 5
    kinds = {label["name"]: label["type"] for label in LABELS}
    np.testing.assert_array_equal(_cvat_shape(items[0], 30, 20, kinds), square)
    np.testing.assert_array_equal(_cvat_shape(items[2], 30, 20, kinds), dot)
    assert "points" not in items[2]
    assert detector.detector_reply([], config) == "[]"
