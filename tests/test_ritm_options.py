"""RITM options that the official references do not cover: shapes and plumbing only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.models.ritm.loader import build_model
from backends.models.ritm.model import HRNetModel, RitmConfig, click_maps
from backends.models.ritm.predictor import NetClick, RitmPredictor

torch.set_num_threads(2)


@pytest.mark.parametrize(
    "config",
    [
        RitmConfig(width=18, ocr_width=48, small=True, use_rgb_conv=True),
        RitmConfig(width=18, ocr_width=0, small=True, use_rgb_conv=False, conv_extend=True),
        RitmConfig(
            width=18,
            ocr_width=48,
            small=True,
            use_rgb_conv=False,
            with_prev_mask=True,
            binary_prev_mask=True,
            with_aux_output=True,
        ),
    ],
    ids=["rgb_conv", "conv_extend_no_ocr", "binary_prev_mask"],
)
def test_variants_build_and_run(config: RitmConfig) -> None:
    torch.manual_seed(0)
    model = HRNetModel(config).eval()
    # Its own state dict must load strictly into a fresh copy.
    build_model(config, model.state_dict(), "test")
    channels = 4 if config.with_prev_mask else 3
    image = torch.rand(2, channels, 70, 90)
    points = torch.tensor([[[10, 20, 0], [-1, -1, -1]], [[30, 40, 0], [50, 60, 1]]])
    with torch.inference_mode():
        out = model(image, points)
    assert out["instances"].shape == (2, 1, 70, 90)
    if config.ocr_width > 0:
        aux_hw = (70, 90) if config.with_aux_output else (18, 23)
        assert out["instances_aux"].shape[2:] == aux_hw
    else:
        assert "instances_aux" not in out


def test_click_maps_disks_and_distances() -> None:
    points = torch.tensor([[[5, 5, 0], [-1, -1, -1], [0, 9, 1], [-1, -1, -1]]])
    disks = click_maps(points, 12, 12, 5, use_disks=True)
    assert disks.shape == (1, 2, 12, 12)
    rows, cols = np.mgrid[:12, :12]
    np.testing.assert_array_equal(disks[0, 0].numpy(), (rows - 5) ** 2 + (cols - 5) ** 2 <= 25)
    np.testing.assert_array_equal(disks[0, 1].numpy(), rows**2 + (cols - 9) ** 2 <= 25)
    smooth = click_maps(points.double(), 12, 12, 5, use_disks=False)
    d = np.sqrt((rows - 5) ** 2 + (cols - 5) ** 2) / 5
    np.testing.assert_allclose(smooth[0, 0].numpy(), np.tanh(2 * d), atol=1e-6)
    # Padding only: every pixel is "far" (1e6 before thresholding).
    empty = click_maps(torch.full((1, 2, 3), -1), 4, 4, 5, use_disks=True)
    assert not empty.any()


@pytest.fixture(scope="module")
def tiny_predictor_net() -> HRNetModel:
    torch.manual_seed(0)
    config = RitmConfig(
        width=18,
        ocr_width=48,
        small=True,
        use_rgb_conv=False,
        with_prev_mask=True,
        use_disks=True,
        norm_radius=5,
    )
    return HRNetModel(config).eval()


def test_longest_side_limit(tiny_predictor_net: HRNetModel) -> None:
    image = np.random.default_rng(0).integers(0, 256, (150, 300, 3), dtype=np.uint8)
    limited = RitmPredictor(tiny_predictor_net, max_size=120)
    result = limited.step(image, [NetClick(70, 140, True)], None)
    assert result.info.net_input_hw == (60, 120)
    assert result.info.points.dtype == torch.float64
    assert result.probs.shape == (150, 300)
    # y: 60 * 70 / 150 = 28, x: 120 * 140 / 300 = 56; mirrored x: 120 - 56 - 1 = 63
    assert result.info.points[0, 0].tolist() == [28.0, 56.0, 0.0]
    assert result.info.points[1, 0].tolist() == [28.0, 63.0, 0.0]
    unlimited = RitmPredictor(tiny_predictor_net, with_flip=False)
    plain = unlimited.step(image, [NetClick(70, 140, True)], None)
    assert plain.info.net_input_hw == (150, 300)
    assert plain.info.points.shape == (1, 2, 3) and plain.info.points.dtype == torch.int64
    with pytest.raises(ValueError, match="outside"):
        unlimited.step(image, [NetClick(150, 0, True)], None)


def test_segmenter_previous_mask_replaces_history(tiny_predictor_net: HRNetModel) -> None:
    from backends.models.ritm import RitmSegmenter
    from backends.prompts import Click, Prompt

    seg = RitmSegmenter("ritm-tiny", RitmPredictor(tiny_predictor_net))
    assert seg.accepts_box is False
    image = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    clicks = (Click(60.2, 40.7, True), Click(20.0, 70.0, False))
    expected_clicks = (NetClick(41, 60, True), NetClick(70, 20, False))
    mask = np.zeros((90, 120), dtype=bool)
    mask[30:60, 40:90] = True
    result, state = seg.decode(image, None, Prompt(clicks, previous_mask=mask), None)
    direct = seg.predictor.step(image, expected_clicks, None, prev_mask=mask.astype(np.float32))
    np.testing.assert_array_equal(state.probs, direct.probs)
    assert state.clicks == expected_clicks and not direct.info.zoom_applied
    np.testing.assert_array_equal(result.mask, direct.probs > 0.49)
    # The mask really is the network's previous-mask input.
    no_mask = seg.predictor.step(image, expected_clicks, None)
    assert not np.array_equal(no_mask.probs, direct.probs)
