"""A click on a brush region a task already holds refines that region (issue 15, item 3): over the
backend's real HTTP app, with the task JSON Label Studio 1.23.2 sends along with a click."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backends import masks
from backends.evaluation.clicker import ground_truth_from_label, iou, next_click
from backends.evaluation.refine import coarse_mask
from backends.labelstudio.frames import Frame
from backends.labelstudio.labelconfig import Control
from backends.labelstudio.refine import ImageGeometry, region_to_refine
from backends.prompts import Click
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.test_labelstudio import BRUSH_ONLY, _client, _keypoint, _predict_body

URL = "/data/upload/1/person8.bmp"


@pytest.fixture(scope="module")
def person8(grabcut_dir):
    """An image where one click from scratch finds little of the person (IoU 0.16)."""
    data = (grabcut_dir / "data_GT" / "person8.bmp").read_bytes()
    gt = ground_truth_from_label(cv2.imread(str(grabcut_dir / "boundary_GT" / "person8.bmp")))
    return data, gt


@pytest.fixture()
def fake_ls(person8):
    server = FakeLabelStudio()
    server.files[URL] = (person8[0], "image/bmp")
    yield server
    server.close()


def _brush(mask: np.ndarray, label: str = "Object", region_id: str = "pre1") -> dict:
    height, width = mask.shape
    return {
        "id": region_id,
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": masks.mask_to_ls_rle(mask), "brushlabels": [label]},
    }


def _task(source: str = "predictions", regions: list | None = None) -> dict:
    task = {"id": 7, "data": {"image": URL}, "annotations": [], "predictions": [], "drafts": []}
    task[source] = [{"id": 1, "result": regions or [], "score": 0.5}]
    return task


def _pct(row: int, col: int, gt: np.ndarray) -> tuple[float, float]:
    height, width = gt.shape
    return (col + 0.5) / width * 100, (row + 0.5) / height * 100


def _click(client, gt, clicks, task) -> np.ndarray:
    height, width = gt.shape
    keypoints = [
        _keypoint(*_pct(row, col, gt), positive, w=width, h=height) for row, col, positive in clicks
    ]
    response = client.post(
        "/predict", json=_predict_body(keypoints, config=BRUSH_ONLY, url=URL, tasks=[task])
    )
    assert response.status_code == 200, response.text
    [brush] = response.json()["results"][0]["result"]
    return np.reshape(decode_rle(brush["value"]["rle"]), (height, width, 4))[:, :, 3] > 0


def test_a_click_inside_a_predicted_region_refines_it(fake_ls, person8):
    _, gt = person8
    existing = coarse_mask(gt, "dilate15")
    client = _client(fake_ls)
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))  # the object's centre
    assert existing[row, col]
    scratch = _click(client, gt, [(row, col, True)], _task(regions=[]))
    refined = _click(client, gt, [(row, col, True)], _task(regions=[_brush(existing)]))
    overlap = (refined & existing).sum() / (refined | existing).sum()
    scratch_overlap = (scratch & existing).sum() / (scratch | existing).sum()
    assert overlap > 0.7 and overlap > scratch_overlap + 0.4
    assert iou(gt, refined) > iou(gt, scratch) + 0.4

    # The same region in an annotation or the annotator's draft is refined the same way.
    for source in ("annotations", "drafts"):
        again = _click(client, gt, [(row, col, True)], _task(source, [_brush(existing)]))
        np.testing.assert_array_equal(again, refined)


def test_a_negative_click_alone_trims_the_region(fake_ls, person8):
    """A negative click needs no positive one when there is a region to trim."""
    _, gt = person8
    existing = coarse_mask(gt, "dilate15")
    row, col, positive = next_click(gt, existing)
    assert not positive
    refined = _click(_client(fake_ls), gt, [(row, col, False)], _task(regions=[_brush(existing)]))
    assert not refined[row, col]
    assert refined.sum() < existing.sum()
    assert iou(gt, refined) > iou(gt, existing)


def test_a_far_click_another_label_or_refine_off_start_a_new_object(fake_ls, person8):
    _, gt = person8
    client = _client(fake_ls)
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))
    inside = [(row, col, True)]
    plain = _click(client, gt, inside, _task(regions=[]))
    existing = coarse_mask(gt, "dilate15")
    # A region elsewhere (30 px square in a corner, far from the click): a new object.
    corner = np.zeros(gt.shape, bool)
    corner[:30, :30] = True
    assert np.hypot(row - 30, col - 30) > 0.02 * max(gt.shape)
    np.testing.assert_array_equal(
        _click(client, gt, inside, _task(regions=[_brush(corner)])), plain
    )
    # The region under the click, but of another label: a new object.
    other = _task(regions=[_brush(existing, label="Other")])
    np.testing.assert_array_equal(_click(client, gt, inside, other), plain)
    off = _client(fake_ls, refine=False)
    np.testing.assert_array_equal(_click(off, gt, inside, _task(regions=[_brush(existing)])), plain)
    assert not np.array_equal(_click(client, gt, inside, _task(regions=[_brush(existing)])), plain)


def test_a_broken_region_is_skipped_and_the_click_still_answers(fake_ls, person8):
    _, gt = person8
    row, col, _ = next_click(gt, np.zeros(gt.shape, bool))
    broken = _brush(coarse_mask(gt, "dilate15"))
    broken["value"]["rle"] = broken["value"]["rle"][:20]
    wrong_size = _brush(np.ones((10, 10), bool), region_id="tiny")
    client = _client(fake_ls)
    plain = _click(client, gt, [(row, col, True)], _task(regions=[]))
    answer = _click(client, gt, [(row, col, True)], _task(regions=[broken, wrong_size]))
    np.testing.assert_array_equal(answer, plain)


# --------------------------------------------------------------------------------------------
# Choosing the region (no HTTP)

OUTPUTS = [(Control("brush", "brushlabels", "image", ("Object", "Other")), "Object")]
IMAGE = ImageGeometry(100, 200)


def _square(top: int, left: int, side: int = 20) -> np.ndarray:
    mask = np.zeros((100, 200), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_the_region_containing_or_nearest_the_first_click_is_chosen():
    a, b = _brush(_square(10, 10), region_id="a"), _brush(_square(10, 100), region_id="b")
    task = _task(regions=[a, b])
    found = region_to_refine(task, "image", OUTPUTS, Click(110, 20), IMAGE, 0.02)
    assert found is not None and found.region_id == "b" and found.distance == 0
    assert found.source == "predictions[0]" and found.mask.sum() == 400
    near = region_to_refine(task, "image", OUTPUTS, Click(122, 20), IMAGE, 0.02)  # 3 px right of b
    assert near is not None and near.region_id == "b" and 2 < near.distance < 4
    assert region_to_refine(task, "image", OUTPUTS, Click(126, 20), IMAGE, 0.02) is None  # > 4 px
    assert region_to_refine(task, "image", OUTPUTS, Click(126, 20), IMAGE, 0.05) is not None
    # This backend's own earlier answer is never a starting point.
    skipped = region_to_refine(task, "image", OUTPUTS, Click(110, 20), IMAGE, 0.02, {"b"})
    assert skipped is None


def test_a_draft_wins_a_tie_over_an_annotation_and_a_prediction():
    task = _task(regions=[_brush(_square(10, 10), region_id="p")])
    task["annotations"] = [{"id": 2, "result": [_brush(_square(10, 10), region_id="a")]}]
    task["drafts"] = [{"id": 3, "result": [_brush(_square(5, 5), region_id="d")]}]
    found = region_to_refine(task, "image", OUTPUTS, Click(15, 15), IMAGE, 0.02)
    assert found is not None and (found.region_id, found.source) == ("d", "drafts[0]")


def test_at_most_max_refine_regions_are_decoded(monkeypatch):
    regions = [_brush(_square(10, 10 * i, 5), region_id=f"r{i}") for i in range(6)]
    task = _task(regions=regions)
    found = region_to_refine(task, "image", OUTPUTS, Click(52, 12), IMAGE, 0.02)
    assert found is not None and found.region_id == "r5"
    monkeypatch.setenv("TAPMASK_MAX_REFINE_REGIONS", "3")
    assert region_to_refine(task, "image", OUTPUTS, Click(52, 12), IMAGE, 0.02) is None


@pytest.mark.parametrize("orientation", [1, 5, 6, 7, 8])
def test_a_stored_region_maps_onto_the_decoded_image(orientation):
    """``Frame.to_image`` is ``Frame.mask`` backwards, EXIF rotations and scaling included."""
    rng = np.random.default_rng(orientation)
    image_mask = rng.random((30, 40)) > 0.5
    swaps = orientation in (5, 6, 7, 8)
    declared = (30, 40) if swaps else (40, 30)  # width, height
    frame = Frame(*declared, 40, 30, orientation)
    np.testing.assert_array_equal(frame.to_image(frame.mask(image_mask)), image_mask)
    scaled = Frame(declared[0] * 2, declared[1] * 2, 40, 30, orientation)
    np.testing.assert_array_equal(scaled.to_image(scaled.mask(image_mask)), image_mask)


def _polygon(mask: np.ndarray, region_id: str = "poly1") -> dict:
    """A polygon region the way this backend writes one (``predict.regions``)."""
    height, width = mask.shape
    points = np.asarray(masks.largest_polygon(mask, 1.0), float) + 0.5
    return {
        "id": region_id,
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": width,
        "original_height": height,
        "value": {
            "points": masks.polygon_to_percent(points, width, height),
            "closed": True,
            "polygonlabels": ["Object"],
        },
    }


def test_a_polygon_region_is_refined_too(fake_ls, person8):
    """Pre-annotations written as polygons (``tapmask annotate --format polygons``) refine the
    same way: a lone negative click trims the polygon's area."""
    _, gt = person8
    existing = coarse_mask(gt, "dilate15")
    poly_outputs = [(Control("poly", "polygonlabels", "image", ("Object",)), "Object")]
    height, width = gt.shape
    task = _task(regions=[_polygon(existing)])
    found = region_to_refine(
        task, "image", poly_outputs, Click(0, 0), ImageGeometry(height, width), 1.0
    )
    assert found is not None and (found.mask ^ existing).sum() < 0.02 * existing.sum()

    from tests.test_labelstudio import CONFIG

    row, col, _ = next_click(gt, existing)
    keypoint = _keypoint(*_pct(row, col, gt), False, w=width, h=height)
    body = _predict_body([keypoint], config=CONFIG, url=URL, tasks=[task])
    response = _client(fake_ls).post("/predict", json=body)
    assert response.status_code == 200, response.text
    [brush] = [r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    refined = np.reshape(decode_rle(brush["value"]["rle"]), (height, width, 4))[:, :, 3] > 0
    assert not refined[row, col] and iou(gt, refined) > iou(gt, existing)
