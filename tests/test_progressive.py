"""Progressive (local) corrections: a click far from a correct region cannot change it."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from backends import images
from backends.engine import Engine, EngineConfig
from backends.progressive import MergeOptions, enabled, merge, parse_setting
from backends.prompts import Box, Click, Prompt, Segmentation
from tests.conftest import TINY_SAM

# -- the merge itself ---------------------------------------------------------------------------


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """A previous mask with a correct square at the top left, and a prediction that adds the
    clicked square at the bottom right but also (wrongly) erases the top-left one."""
    previous = np.zeros((60, 80), bool)
    previous[5:20, 5:20] = True
    candidate = np.zeros((60, 80), bool)
    candidate[35:55, 50:75] = True
    return previous, candidate


def test_merge_takes_the_prediction_only_in_the_clicked_region():
    previous, candidate = _masks()
    merged = merge(previous, candidate, Click(60, 45))
    assert merged[5:20, 5:20].all()  # far from the click: unchanged
    assert merged[35:55, 50:75].all()  # the clicked region: the prediction
    assert merged.sum() == previous.sum() + candidate.sum()


def test_merge_moves_a_boundary_both_ways_inside_the_region():
    previous = np.zeros((40, 40), bool)
    previous[10:30, 10:20] = True
    candidate = previous.copy()
    candidate[10:20, 17:20] = False  # the boundary tilts: off at the top…
    candidate[20:30, 20:23] = True  # …on at the bottom, one 8-connected changed region
    merged = merge(previous, candidate, Click(21, 25), MergeOptions(reach=None))
    # ClickSEG's merge would only add (the click is outside the previous mask) and keep the top.
    assert np.array_equal(merged, candidate)


def test_merge_keeps_the_previous_mask_when_the_click_changed_nothing():
    previous, _ = _masks()
    candidate = np.zeros_like(previous)  # a model that ignores the click and drops everything
    merged = merge(previous, candidate, Click(60, 45))
    assert np.array_equal(merged, previous)


def test_a_connected_leak_reaches_only_as_far_as_the_click_is_deep():
    previous = np.zeros((100, 100), bool)
    previous[40:60, 40:60] = True
    candidate = previous.copy()
    candidate[:, 60:] = True  # a positive click just right of the mask leaks over the whole side
    shallow = merge(previous, candidate, Click(62, 50))  # 3 px from the mask: reach 4 × 3 = 12
    assert shallow[38:63, 60:75].all() and not shallow[:, 75:].any() and not shallow[:37].any()
    deep = np.zeros_like(previous)
    deep[40:60, 20:40] = True
    deep_candidate = deep | candidate
    deeper = merge(deep, deep_candidate, Click(80, 50))  # 41 px from the mask: reach 164
    assert np.array_equal(deeper, deep_candidate)
    capped = merge(previous, candidate, Click(62, 50), MergeOptions(window=0.05))
    assert capped[45:56, 60:68].all() and not capped[:, 68:].any()
    unbounded = merge(previous, candidate, Click(62, 50), MergeOptions(reach=None))
    assert np.array_equal(unbounded, candidate)  # FocalClick's rule: the whole component


def test_settings_per_model_and_for_all():
    assert parse_setting("") == {}
    assert parse_setting("on") == {"*": True}
    settings = parse_setting("off, grabcut=on ,sam-vit_h=0")
    assert settings == {"*": False, "grabcut": True, "sam-vit_h": False}
    assert enabled(settings, "grabcut", False) and not enabled(settings, "ritm-h18", True)
    assert enabled({}, "x", True) and not enabled({}, "x", False)
    with pytest.raises(ValueError, match="TAPMASK_PROGRESSIVE"):
        parse_setting("grabcut=maybe")


# -- through the Engine: a deterministic model whose second answer wrecks the first ------------


class WreckingModel:
    """First click: the clicked square. Later clicks: only the last clicked square (everything
    earlier vanishes), the failure an annotator notices. History-free, like GrabCut used to be."""

    name = "wrecking"
    replays_history = False

    def __init__(self) -> None:
        self.decodes = 0

    def encode(self, image: np.ndarray) -> None:
        return None

    def decode(self, image, embedding, prompt: Prompt, state):
        self.decodes += 1
        mask = np.zeros(image.shape[:2], bool)
        if prompt.clicks:
            x, y = int(prompt.clicks[-1].x), int(prompt.clicks[-1].y)
            mask[max(0, y - 5) : y + 6, max(0, x - 5) : x + 6] = prompt.clicks[-1].positive
        elif prompt.box is not None:
            x1, y1, x2, y2 = (int(v) for v in prompt.box.as_xyxy())
            mask[y1 : y2 + 1, x1 : x2 + 1] = True
        return Segmentation(mask, 0.9), None


def _png(width: int = 80, height: int = 60) -> bytes:
    return images.encode_png(np.zeros((height, width, 3), np.uint8))


def _engine(progressive: bool) -> tuple[Engine, WreckingModel]:
    model = WreckingModel()
    return Engine({"m": model}, EngineConfig(progressive={"m": progressive})), model


def test_engine_progressive_keeps_far_regions_and_plain_does_not():
    clicks = (Click(15, 15), Click(60, 40))
    plain, _ = _engine(False)
    assert not plain.segment("m", _png(), Prompt(clicks)).mask[15, 15]  # the wreck
    engine, _ = _engine(True)
    first = engine.segment("m", _png(), Prompt(clicks[:1])).mask
    second = engine.segment("m", _png(), Prompt(clicks)).mask
    assert np.array_equal(second[:, :40], first[:, :40]) and second[40, 60]


def test_engine_progressive_answer_does_not_depend_on_the_cache():
    clicks = (Click(15, 15), Click(60, 40), Click(16, 16, False), Click(30, 10))
    warm, _ = _engine(True)
    for n in range(1, len(clicks) + 1):
        warm_mask = warm.segment("m", _png(), Prompt(clicks[:n])).mask
    cold, model = _engine(True)  # a worker that never saw the earlier clicks
    cold_mask = cold.segment("m", _png(), Prompt(clicks)).mask
    assert model.decodes == len(clicks)  # it replayed every prefix
    assert np.array_equal(warm_mask, cold_mask)
    # The negative click removed the first square (its region), the others stayed or came.
    assert not cold_mask[15, 15] and cold_mask[40, 60] and cold_mask[10, 30]


def test_engine_progressive_after_a_box():
    engine, _ = _engine(True)
    box = Box(5, 5, 30, 30)
    mask = engine.segment("m", _png(), Prompt((Click(60, 40),), box)).mask
    assert mask[5:31, 5:31].all() and mask[40, 60]  # the click added to the box's mask


def test_engine_progressive_merges_into_a_caller_supplied_mask():
    previous = np.zeros((60, 80), bool)
    previous[10:21, 10:21] = True
    engine, _ = _engine(True)
    mask = engine.segment("m", _png(), Prompt((Click(60, 40),), previous_mask=previous)).mask
    assert mask[10:21, 10:21].all() and mask[40, 60]
    plain, _ = _engine(False)
    assert not plain.segment("m", _png(), Prompt((Click(60, 40),), previous_mask=previous)).mask[
        15, 15
    ]


class SquaresModel(WreckingModel):
    """The union of a square around every positive click, whatever the mask it is given."""

    def decode(self, image, embedding, prompt: Prompt, state):
        self.decodes += 1
        mask = np.zeros(image.shape[:2], bool)
        for click in prompt.positives:
            mask[int(click.y) - 5 : int(click.y) + 6, int(click.x) - 5 : int(click.x) + 6] = True
        return Segmentation(mask, 1.0), None


def test_engine_progressive_merges_every_click_into_a_caller_supplied_mask():
    """A refined pre-annotation (Label Studio resends every click with the same region): each
    click's correction stays, not only the last one's."""
    previous = np.zeros((60, 80), bool)
    previous[10:21, 10:21] = True
    engine = Engine({"m": SquaresModel()}, EngineConfig(progressive={"m": True}))
    clicks = (Click(60, 40), Click(40, 45))
    mask = engine.segment("m", _png(), Prompt(clicks, previous_mask=previous)).mask
    assert mask[10:21, 10:21].all() and mask[40, 60] and mask[45, 40]


def test_env_turns_progressive_on_per_model(monkeypatch):
    monkeypatch.setenv("TAPMASK_PROGRESSIVE", "m=on")
    engine = Engine({"m": WreckingModel(), "n": WreckingModel()})
    assert engine.progressive("m") and not engine.progressive("n")


# -- a tiny SAM through the same Engine path ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam(tiny_sam_checkpoint):
    def build(progressive: bool) -> Engine:
        engine = Engine(config=EngineConfig(progressive={"sam": progressive}))
        engine.load(["sam"], checkpoint=tiny_sam_checkpoint, device="cpu", architecture=TINY_SAM)
        return engine

    return build


def _changed_components(before: np.ndarray, after: np.ndarray) -> int:
    import cv2

    count, _ = cv2.connectedComponents((before != after).astype(np.uint8), connectivity=8)
    return count - 1


def test_tiny_sam_progressive_changes_only_the_clicked_region(tiny_sam):
    rng = np.random.default_rng(5)
    image = images.encode_png(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    clicks = (Click(40, 40), Click(120, 90, False), Click(100, 30))
    plain, progressive = tiny_sam(False), tiny_sam(True)
    plain_masks = [plain.segment("sam", image, Prompt(clicks[:n])).mask for n in (1, 2, 3)]
    masks = [progressive.segment("sam", image, Prompt(clicks[:n])).mask for n in (1, 2, 3)]
    assert np.array_equal(masks[0], plain_masks[0])  # the first click is the model's own
    # Random weights scatter changes all over the image; progressive keeps at most the one
    # connected region that holds the click.
    assert max(_changed_components(a, b) for a, b in pairwise(plain_masks)) > 1
    for (before, after), click in zip(pairwise(masks), clicks[1:], strict=True):
        assert _changed_components(before, after) <= 1
        changed = before != after
        if changed.any():
            assert changed[int(click.y), int(click.x)]
    cold = tiny_sam(True).segment("sam", image, Prompt(clicks)).mask
    assert np.array_equal(cold, masks[-1])  # replayed from scratch: the same mask
