"""GrabCut, the weights-free default, on the real GrabCut benchmark with the NoC clicker."""

import numpy as np

from backends import images
from backends.engine import Engine
from backends.evaluation.datasets import load_samples
from backends.evaluation.noc import evaluate_sample, summarise
from backends.models.grabcut import GrabCutSegmenter
from backends.prompts import Box, Click, Prompt


def test_reaches_iou_085_within_5_clicks_on_35_of_50_grabcut_images(grabcut_dir):
    engine = Engine({"grabcut": GrabCutSegmenter()})
    samples = list(load_samples(grabcut_dir))
    assert len(samples) == 50
    results = [
        evaluate_sample(
            lambda data, prompt: engine.segment("grabcut", data, prompt),
            s.name,
            s.image_bytes,
            s.gt,
            max_clicks=5,
            stop_iou=0.85,
        )
        for s in samples
    ]
    reached = sum(1 for r in results if max(r.ious) >= 0.85)
    print("GrabCut reached 0.85 within 5 clicks on", reached, "of 50;", summarise(results, 5))
    assert reached >= 35


def _scene() -> np.ndarray:
    img = np.full((120, 160, 3), (30, 90, 30), np.uint8)
    img[30:90, 50:110] = (220, 60, 60)  # a red square on green
    return img


def test_box_alone_and_negative_click():
    model = GrabCutSegmenter()
    image = _scene()
    seg, _ = model.decode(image, None, Prompt(box=Box(40, 20, 120, 100)), None)
    inside = seg.mask[30:90, 50:110].mean()
    assert inside > 0.9 and seg.mask.sum() < 1.3 * 60 * 60
    seg, _ = model.decode(image, None, Prompt((Click(80, 60), Click(10, 10, False))), None)
    assert seg.mask[60, 80] and not seg.mask[10, 10]


def test_large_frames_are_processed_at_working_size_and_scaled_back():
    image = np.kron(_scene(), np.ones((10, 10, 1), np.uint8))  # 1200×1600
    seg, _ = GrabCutSegmenter().decode(image, None, Prompt((Click(800, 600),)), None)
    assert seg.mask.shape == (1200, 1600)
    assert seg.mask[300:900, 500:1100].mean() > 0.9 and seg.mask.mean() < 0.25


def test_png_roundtrip_through_engine():
    engine = Engine({"grabcut": GrabCutSegmenter()})
    seg = engine.segment("grabcut", images.encode_png(_scene()), Prompt((Click(80, 60),)))
    assert seg.model == "grabcut" and 0 < seg.score <= 1
