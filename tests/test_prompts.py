import math

import numpy as np
import pytest

from backends.errors import PromptError
from backends.prompts import Box, Click, Prompt, Segmentation


def test_click_rejects_non_finite_and_non_numbers():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(PromptError, match="finite"):
            Click(bad, 3)
    with pytest.raises(PromptError, match="must be a number"):
        Click("3", 4)  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        Click(True, 4)  # type: ignore[arg-type]


def test_inverted_box_and_empty_prompt_raise():
    with pytest.raises(PromptError, match="inverted"):
        Box(10, 10, 5, 20)
    with pytest.raises(PromptError, match="empty"):
        Prompt(())


def test_clicks_just_outside_are_clipped_far_outside_rejected():
    prompt = Prompt((Click(-3, 50), Click(102, 99.5))).validated(100, 100)
    assert (prompt.clicks[0].x, prompt.clicks[0].y) == (0.0, 50.0)
    assert (prompt.clicks[1].x, prompt.clicks[1].y) == (99.0, 99.0)
    with pytest.raises(PromptError, match="outside"):
        Prompt((Click(500, 50),)).validated(100, 100)
    with pytest.raises(PromptError, match="outside"):
        Prompt((Click(50, -40),)).validated(100, 100)
    box = Prompt(box=Box(-2, -2, 104, 50)).validated(100, 100).box
    assert box is not None and box.as_xyxy() == (0, 0, 99, 50)


def test_previous_mask_shape_is_checked():
    with pytest.raises(PromptError, match="shape"):
        Prompt((Click(1, 1),), previous_mask=np.zeros((5, 5), bool)).validated(10, 10)


def test_prefix_and_key_identify_interaction_steps():
    prompt = Prompt((Click(1, 2), Click(3.00001, 4, False)), Box(0, 0, 9, 9))
    assert prompt.prefix(1).key() == Prompt((Click(1, 2),), Box(0, 0, 9, 9)).key()
    assert prompt.prefix(0).clicks == ()
    # float noise from percent conversions does not break the cache key
    assert prompt.key() == Prompt((Click(1, 2), Click(3.0, 4, False)), Box(0, 0, 9, 9)).key()
    assert prompt.key() != Prompt((Click(1, 2), Click(3, 4, True)), Box(0, 0, 9, 9)).key()


def test_json_round_trip_and_malformed_input():
    prompt = Prompt((Click(1.5, 2, True), Click(3, 4, False)), Box(0, 1, 8, 9))
    assert Prompt.from_dict(prompt.to_dict()).key() == prompt.key()
    with pytest.raises(PromptError):
        Prompt.from_dict({"clicks": [[1, 2]]})
    with pytest.raises(PromptError):
        Prompt.from_dict({"clicks": [["a", 2, True]]})


def test_segmentation_normalises_mask():
    seg = Segmentation(np.array([[0, 2], [0, 0]], np.uint8), np.float32(0.5))
    assert seg.mask.dtype == bool and seg.area == 1 and isinstance(seg.score, float)
    with pytest.raises(ValueError):
        Segmentation(np.zeros((2, 2, 2)), 1.0)
