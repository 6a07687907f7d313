"""Numerical equivalence of backends.models.ritm with the official RITM code.

The references (``shared/reference/ritm``, a sibling of the repository) were produced by the
official SamsungLabs implementation on two synthetic checkpoints; their README fixes every
convention and tolerance used here. Missing reference data is a failure, never a skip.

Cost: the pipeline replay (5 samples × 8 clicks × 2 configs, each step a batch of 2 at ≤ 400 px
except first clicks and stale-ROI steps at full size) dominates; it is computed once per config
(``replays`` fixture) and shared by the replay, loop and segmenter tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.errors import ModelLoadError, PromptError
from backends.evaluation.clicker import iou, next_click
from backends.models.base import Segmenter
from backends.models.ritm import RitmSegmenter, build, resolve_checkpoint
from backends.models.ritm.loader import build_model, config_from_checkpoint, load_checkpoint
from backends.models.ritm.model import HRNetModel, RitmConfig
from backends.models.ritm.predictor import (
    NetClick,
    PredictorState,
    RitmPredictor,
    StepResult,
    clicks_inside,
    object_roi,
    roi_iou,
)
from backends.prompts import Box, Click, Prompt

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "ritm"
CONFIGS = ("h18s", "h18")
CASES = ("A", "B", "C")
SAMPLES = range(5)
PROB_TOL = 1e-3
THRESH = 0.49

torch.set_num_threads(2)


def ref_path(name: str) -> Path:
    path = REF / name
    assert path.is_file(), f"missing RITM reference file {path}"
    return path


@cache
def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(ref_path(name), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@cache
def manifest() -> dict:
    return json.loads(ref_path("manifest.json").read_text())


def checkpoint_path(cfg: str) -> Path:
    return ref_path(f"ritm_{cfg}_itermask_synthetic.pth")


@cache
def net(cfg: str) -> HRNetModel:
    model, _ = load_checkpoint(checkpoint_path(cfg))
    return model


@cache
def predictor(cfg: str) -> RitmPredictor:
    return RitmPredictor(net(cfg), "cpu")


def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
    data = npz("pipeline_inputs.npz")
    return data[f"s{i}_image"], data[f"s{i}_gt"]


def recorded_clicks(cfg: str, i: int) -> tuple[NetClick, ...]:
    rec = npz(f"pipeline_{cfg}_itermask.npz")[f"s{i}_clicks"]
    return tuple(NetClick(int(y), int(x), bool(p)) for y, x, p in rec)


@cache
def replay(cfg: str, i: int) -> tuple[StepResult, ...]:
    """Official replay: a fresh interaction, one step after each recorded click."""
    image, _ = sample(i)
    clicks = recorded_clicks(cfg, i)
    state: PredictorState | None = None
    results = []
    for k in range(len(clicks)):
        result = predictor(cfg).step(image, clicks[: k + 1], state)
        state = result.state
        results.append(result)
    return tuple(results)


def _roi(row: np.ndarray) -> tuple[int, ...] | None:
    return None if int(row[0]) == -1 else tuple(int(v) for v in row)


# --- reference data ---------------------------------------------------------------------------


def test_reference_files_match_manifest() -> None:
    assert REF.is_dir(), f"RITM reference directory {REF} is missing"
    files = manifest()["files"]
    present = {p.name for p in REF.iterdir()}
    assert present == set(files) | {"README.md", "manifest.json"}
    for name, meta in files.items():
        data = ref_path(name).read_bytes()
        assert len(data) == meta["bytes"], name
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_strict_load(cfg: str) -> None:
    model, config = load_checkpoint(checkpoint_path(cfg))
    meta = manifest()["configs"][f"{cfg}_itermask"]
    for key, value in meta["hrnet_kwargs"].items():
        assert getattr(config, key) == value, key
    state = model.state_dict()
    assert len(state) == meta["n_keys"]
    checkpoint = torch.load(checkpoint_path(cfg), map_location="cpu", weights_only=True)
    assert list(state) == list(checkpoint["state_dict"])
    n_float = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert n_float == meta["n_float_values"]
    for key, tensor in checkpoint["state_dict"].items():
        assert torch.equal(state[key], tensor), key


def _checkpoint(cfg: str = "h18s") -> dict:
    return torch.load(checkpoint_path(cfg), map_location="cpu", weights_only=True)


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelLoadError, match=r"nope\.pth"):
        load_checkpoint(missing)
    with pytest.raises(ModelLoadError, match=r"nope\.pth"):
        build("ritm-h18", checkpoint=missing)


def test_load_key_mismatch_names_keys() -> None:
    ckpt = _checkpoint()
    config = config_from_checkpoint(ckpt["config"])
    sd = dict(ckpt["state_dict"])
    del sd["feature_extractor.cls_head.weight"]
    sd["feature_extractor.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError) as err:
        build_model(config, sd, "test")
    message = str(err.value)
    assert "missing keys 1 [feature_extractor.cls_head.weight]" in message
    assert "unexpected keys 1 [feature_extractor.extra.weight]" in message
    # A checkpoint of another architecture (h18 weights, h18s config): many keys, counted.
    with pytest.raises(ModelLoadError, match=r"unexpected keys \d+ \[.*more\)"):
        build_model(config, _checkpoint("h18")["state_dict"], "test")
    sd = dict(ckpt["state_dict"])
    sd["feature_extractor.cls_head.weight"] = torch.zeros(2, 96, 1, 1)
    with pytest.raises(ModelLoadError, match="size mismatch"):
        build_model(config, sd, "test")


def test_load_refuses_unsupported_config(tmp_path: Path) -> None:
    config = _checkpoint()["config"]
    other = {**config, "class": "isegm.model.is_deeplab_model.DeeplabModel"}
    with pytest.raises(ModelLoadError, match="unsupported model class"):
        config_from_checkpoint(other)
    for name, value in (("clicks_groups", [1, 2]), ("cpu_dist_maps", True)):
        params = {**config["params"], name: {"type": "builtin", "value": value, "specified": True}}
        with pytest.raises(ModelLoadError, match=name):
            config_from_checkpoint({**config, "params": params})
    unknown = {"type": "builtin", "value": 1, "specified": True}
    with pytest.raises(ModelLoadError, match="unsupported HRNetModel option frobnicate"):
        config_from_checkpoint({**config, "params": {**config["params"], "frobnicate": unknown}})
    # Unspecified unknown parameters are skipped, as the official load_model does.
    skipped = {**unknown, "specified": False}
    config_from_checkpoint({**config, "params": {**config["params"], "frobnicate": skipped}})
    bad = tmp_path / "bad.pth"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ModelLoadError, match="state_dict"):
        load_checkpoint(bad)


# --- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matches_reference(cfg: str, case: str) -> None:
    inputs = npz("forward_inputs.npz")
    ref = npz(f"forward_{cfg}_itermask.npz")
    image = torch.cat(
        (
            torch.from_numpy(inputs[f"{case}_image"]).permute(0, 3, 1, 2).float() / 255,
            torch.from_numpy(inputs[f"{case}_prev_mask"].astype(np.float32))[:, None],
        ),
        dim=1,
    )
    points = torch.from_numpy(inputs[f"{case}_points"])
    with torch.inference_mode():
        out = net(cfg)(image, points)
    for key in ("instances", "instances_aux"):
        expected = ref[f"{case}_{key}"]
        got = out[key][:, 0].numpy()
        assert got.shape == expected.shape
        err = np.abs(got - expected).max()
        assert err <= 1e-4 * np.abs(expected).max(), f"{key}: max |diff| {err}"


# --- pipeline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("i", SAMPLES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_pipeline_replay(cfg: str, i: int) -> None:
    rec = npz(f"pipeline_{cfg}_itermask.npz")
    results = replay(cfg, i)
    assert len(results) == len(rec[f"s{i}_clicks"])
    for k, result in enumerate(results):
        where = f"{cfg} sample {i} step {k}"
        ref_probs = rec[f"s{i}_probs"][k].astype(np.float32)
        assert result.probs.dtype == np.float32
        assert result.probs.shape == ref_probs.shape
        err = np.abs(result.probs - ref_probs).max()
        assert err <= PROB_TOL, f"{where}: max |p - p_ref| = {err}"
        differ = (result.probs > THRESH) != rec[f"s{i}_masks"][k]
        assert np.all(np.abs(ref_probs[differ] - THRESH) <= PROB_TOL), where

        info = result.info
        assert info.roi == _roi(rec[f"s{i}_rois"][k]), where
        assert info.candidate_roi == _roi(rec[f"s{i}_candidate_rois"][k]), where
        assert info.zoom_applied == bool(rec[f"s{i}_zoom_applied"][k]), where
        assert info.roi_changed == bool(rec[f"s{i}_roi_changed"][k]), where
        assert info.net_input_hw == tuple(int(v) for v in rec[f"s{i}_net_input_hw"][k]), where
        n = int(rec[f"s{i}_net_points_n"][k])
        is_float = bool(rec[f"s{i}_net_points_is_float"][k])
        assert info.points.dtype == (torch.float64 if is_float else torch.int64), where
        expected_points = rec[f"s{i}_net_points"][k]
        assert info.points.shape == (2, 2 * n, 3), where
        assert np.array_equal(info.points.numpy().astype(np.float64), expected_points[:, : 2 * n])
        assert np.all(np.isnan(expected_points[:, 2 * n :]))


def test_pipeline_records_cover_the_tricky_paths() -> None:
    """The replay above exercises ROI replacement, kept ROIs and the stale-ROI paste."""
    rec = npz("pipeline_h18s_itermask.npz")
    stale = (rec["s3_candidate_rois"][:, 0] == -1) & (rec["s3_rois"][:, 0] != -1)
    assert stale.sum() >= 3 and not rec["s3_zoom_applied"][stale].any()
    assert rec["s1_roi_changed"][2]
    assert npz("pipeline_h18_itermask.npz")["s1_net_input_hw"][1].tolist() == [400, 285]


@pytest.mark.parametrize("i", SAMPLES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_clicker_from_recorded_masks(cfg: str, i: int) -> None:
    _, gt = sample(i)
    rec = npz(f"pipeline_{cfg}_itermask.npz")
    masks = rec[f"s{i}_masks"]
    clicks = [tuple(int(v) for v in c) for c in rec[f"s{i}_clicks"]]
    for k, (y, x, positive) in enumerate(clicks):
        previous = masks[k - 1] if k else np.zeros(gt.shape, dtype=bool)
        got = next_click(gt, previous, [(c[0], c[1]) for c in clicks[:k]])
        assert got == (y, x, bool(positive)), f"{cfg} sample {i} click {k}"
        assert np.isclose(iou(gt, masks[k]), rec[f"s{i}_ious"][k], rtol=0, atol=1e-6)


StepFn = Callable[[np.ndarray, tuple[NetClick, ...], PredictorState | None], StepResult]


def noc_loop(
    step: StepFn, image: np.ndarray, gt: np.ndarray, max_clicks: int = 8, max_iou: float = 0.9
) -> tuple[list[NetClick], list[float], list[np.ndarray]]:
    """The official ``evaluate_sample`` loop (min_clicks=1, pred_thr=0.49)."""
    clicks: list[NetClick] = []
    pred_mask = np.zeros(gt.shape, dtype=bool)
    state = None
    ious, masks = [], []
    for _ in range(max_clicks):
        y, x, positive = next_click(gt, pred_mask, [(c.y, c.x) for c in clicks])
        clicks.append(NetClick(y, x, positive))
        result = step(image, tuple(clicks), state)
        state = result.state
        pred_mask = result.probs > THRESH
        masks.append(pred_mask)
        ious.append(iou(gt, pred_mask))
        if ious[-1] >= max_iou:
            break
    return clicks, ious, masks


@pytest.mark.parametrize("i", SAMPLES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_noc_loop_reproduces_clicks_and_ious(cfg: str, i: int) -> None:
    """Clicker + predictor in a closed loop give the recorded clicks and IoUs.

    Predictor steps are deterministic functions of (image, click prefix), so a step whose click
    prefix is one the replay already evaluated reuses that result instead of running the network
    again; any click that differs from the records runs the predictor for real.
    """
    image, gt = sample(i)
    recorded = recorded_clicks(cfg, i)
    known = {recorded[: k + 1]: r for k, r in enumerate(replay(cfg, i))}

    def step(img: np.ndarray, clicks: tuple[NetClick, ...], state: PredictorState | None):
        hit = known.get(clicks)
        return hit if hit is not None else predictor(cfg).step(img, clicks, state)

    clicks, ious, masks = noc_loop(step, image, gt)
    rec = npz(f"pipeline_{cfg}_itermask.npz")
    assert tuple(clicks) == recorded
    for k, value in enumerate(ious):
        n_diff = int((masks[k] != rec[f"s{i}_masks"][k]).sum())
        union = max(1, int(((gt == 1) | masks[k])[gt != -1].sum()))
        assert abs(value - float(rec[f"s{i}_ious"][k])) <= 1e-6 + n_diff / union


# --- the Segmenter surface --------------------------------------------------------------------


@cache
def segmenter() -> RitmSegmenter:
    return build("ritm-h18s", checkpoint=checkpoint_path("h18s"), device="cpu")


def _prompt(clicks: tuple[NetClick, ...], box: Box | None = None) -> Prompt:
    return Prompt(
        tuple(Click(x=float(c.x), y=float(c.y), positive=c.positive) for c in clicks), box
    )


def test_segmenter_step_by_step_matches_replay() -> None:
    """teddy / h18s: ROI set at click 2, replaced at click 3, kept at click 4."""
    seg = segmenter()
    assert isinstance(seg, Segmenter) and seg.replays_history
    image, _ = sample(1)
    clicks = recorded_clicks("h18s", 1)[:4]
    rec = npz("pipeline_h18s_itermask.npz")
    expected = replay("h18s", 1)
    state = None
    assert seg.encode(image) is None
    for k in range(len(clicks)):
        result, state = seg.decode(image, None, _prompt(clicks[: k + 1]), state)
        np.testing.assert_array_equal(state.probs, expected[k].probs)
        assert np.abs(state.probs - rec["s1_probs"][k].astype(np.float32)).max() <= PROB_TOL
        np.testing.assert_array_equal(result.mask, expected[k].probs > THRESH)
        assert result.model == "ritm-h18s"
        assert result.score == pytest.approx(float(state.probs[result.mask].mean()))
        assert result.extra["zoom_roi"] == (
            list(expected[k].info.roi) if expected[k].info.roi else None
        )

    # Without a state (or with one from another prompt) the prefixes are replayed internally.
    fresh, _ = seg.decode(image, None, _prompt(clicks[:3]), None)
    np.testing.assert_array_equal(fresh.mask, expected[2].probs > THRESH)


def test_segmenter_prompt_conventions() -> None:
    seg = segmenter()
    image, _ = sample(1)
    with pytest.raises(PromptError, match="ritm does not take a box"):
        seg.decode(image, None, Prompt((), Box(10, 10, 100, 100)), None)
    first = recorded_clicks("h18s", 1)[0]
    # Float clicks round to the nearest pixel; a box alongside clicks is ignored.
    near = Click(x=first.x + 0.49, y=first.y - 0.5, positive=True)
    result, state = seg.decode(image, None, Prompt((near,), Box(0, 0, 50, 50)), None)
    assert state.clicks == (first,)
    np.testing.assert_array_equal(state.probs, replay("h18s", 1)[0].probs)
    np.testing.assert_array_equal(result.mask, state.probs > THRESH)


def test_resolve_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RITM_CHECKPOINT", raising=False)
    monkeypatch.setenv("TAPMASK_MODELS_DIR", str(tmp_path))
    assert resolve_checkpoint(None, "x.pth") == tmp_path / "x.pth"
    monkeypatch.delenv("TAPMASK_MODELS_DIR")
    assert resolve_checkpoint(None, "x.pth") == Path("~/.cache/tapmask/models/x.pth").expanduser()
    monkeypatch.setenv("RITM_CHECKPOINT", str(tmp_path / "env.pth"))
    assert resolve_checkpoint(None, "x.pth") == tmp_path / "env.pth"
    assert resolve_checkpoint(tmp_path / "arg.pth", "x.pth") == tmp_path / "arg.pth"
    with pytest.raises(ModelLoadError, match=r"env\.pth"):
        build("ritm-h18")
    with pytest.raises(ModelLoadError, match="unknown RITM options"):
        build("ritm-h18", checkpoint=checkpoint_path("h18s"), frobnicate=1)


# --- zoom-in geometry (official misc.py semantics) --------------------------------------------


def test_zoom_geometry() -> None:
    roi = (10, 60, 20, 80)
    assert clicks_inside(roi, [NetClick(10, 20, True), NetClick(59, 79, True)])
    assert not clicks_inside(roi, [NetClick(60, 30, True)])  # last row counts as outside
    assert not clicks_inside(roi, [NetClick(30, 80, True)])  # last column too
    assert clicks_inside(roi, [NetClick(0, 0, False)])  # negative clicks do not matter
    assert roi_iou((0, 9, 0, 9), (5, 14, 0, 9)) == pytest.approx(5 / 15)
    assert roi_iou((0, 9, 0, 9), (20, 29, 0, 9)) == 0.0
    mask = np.zeros((500, 500), dtype=bool)
    mask[100:111, 100:111] = True  # 11 px → 1.4 * 11 < 200 → 200 px crop
    # centre 105, half size 100 → round(5.0) = 5, round(205.0) = 205
    assert object_roi(mask, [], 1.4, 200) == (5, 205, 5, 205)
    mask[:] = False
    mask[100:102, 100:102] = True  # centre 100.5: 0.5 and 200.5 round half to even
    assert object_roi(mask, [], 1.4, 200) == (0, 200, 0, 200)
    # bbox rows 100..499: centre 299.5, size 560 → round(19.5) = 20, 580 clamped to 499
    assert object_roi(mask, [NetClick(499, 499, True)], 1.4, 200) == (20, 499, 20, 499)


def test_config_defaults_are_official() -> None:
    config = RitmConfig()
    assert (config.width, config.ocr_width, config.norm_radius) == (48, 256, 260)
    assert config.use_rgb_conv and not config.use_disks and not config.with_prev_mask


@pytest.mark.parametrize("variant", ["h18", "h18s"])
def test_random_weights_build_the_official_architecture(variant):
    """Benchmarks build RITM untrained: it must be the released checkpoints' network."""
    import torch

    from backends.models import registry

    segmenter = registry.create(f"ritm-{variant}", random_weights=True, device="cpu")
    state = torch.load(
        REF / f"ritm_{variant}_itermask_synthetic.pth", map_location="cpu", weights_only=True
    )["state_dict"]
    ours = segmenter.predictor.net.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    assert segmenter.checkpoint is None
