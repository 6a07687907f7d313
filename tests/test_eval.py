"""`tapmask eval`: the NoC protocol over dataset folders, with CSV curves and a PNG plot."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
from PIL import Image

from backends.cli import main
from backends.evaluation.datasets import detect_layout, load_samples
from backends.evaluation.noc import SampleResult, summarise


def test_eval_grabcut_subset_writes_curves_and_plot(grabcut_dir, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(
        [
            "eval",
            "--model",
            "grabcut",
            "--dataset",
            str(grabcut_dir),
            "--max-clicks",
            "3",
            "--limit",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for column in ("NoC@85", "NoC@90", ">=3@90", "collapse%", "mIoU@1", "mIoU@3", "s/click"):
        assert column in printed
    rows_printed = [line.split() for line in printed.splitlines() if line.startswith("grabcut")]
    assert [row[1] for row in rows_printed] == ["off", "on"]  # both modes, side by side
    for mode in ("plain", "progressive"):
        with (out / f"grabcut_{mode}_GrabCut_ious.csv").open() as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["model", "progressive", "image", "error", "iou_1", "iou_2", "iou_3"]
        assert len(rows) == 4 and all(len(r) == 7 and r[3] == "" for r in rows[1:])
        assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[4:])
    plot = cv2.imread(str(out / "GrabCut_miou.png"))
    assert plot is not None and plot.shape[0] > 100


def test_noc_summary_counts_clicks_to_threshold():
    results = [
        SampleResult("a", [0.5, 0.86, 0.95]),
        SampleResult("b", [0.91, 0.92, 0.93]),
        SampleResult("c", [0.1, 0.2, 0.3]),
    ]
    summary = summarise(results, 3)
    assert summary["NoC@85"] == pytest.approx((2 + 1 + 3) / 3)
    assert summary["NoC@90"] == pytest.approx((3 + 1 + 3) / 3)
    assert summary[">=3@85"] == 1 and summary[">=3@90"] == 2


def test_collapse_rate_and_mean_iou_after_k_clicks():
    results = [
        SampleResult("steady", [0.5, 0.7, 0.9, 0.9, 0.95]),
        SampleResult("collapses", [0.6, 0.97, 0.33, 0.98, 0.40]),  # two drops of more than 0.2
        SampleResult("early-stop", [0.92]),  # stopped after one click: counts its last IoU
        SampleResult("broken", error="click 1: PromptError: no"),
    ]
    summary = summarise(results, 5)
    assert summary["collapse%"] == pytest.approx(100 * 2 / 8)  # 8 follow-up clicks in all
    assert summary["mIoU@1"] == pytest.approx((0.5 + 0.6 + 0.92) / 3)
    assert summary["mIoU@3"] == pytest.approx((0.9 + 0.33 + 0.92) / 3)
    assert summary["mIoU@5"] == pytest.approx((0.95 + 0.40 + 0.92) / 3)
    assert summary["failed"] == 1 and summary["NoC@90"] == pytest.approx((3 + 2 + 1) / 3)


# The standard DAVIS palette starts black, dark red, dark green…: object pixels are index 1.
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)


def _object_label(height: int = 20, width: int = 30) -> np.ndarray:
    label = np.zeros((height, width), np.uint8)
    label[5:15, 5:25] = 1
    return label


def _write_davis(root, name: str, label: np.ndarray) -> None:
    (root / "img").mkdir(exist_ok=True)
    (root / "gt").mkdir(exist_ok=True)
    cv2.imwrite(str(root / "img" / f"{name}.jpg"), np.zeros((*label.shape, 3), np.uint8))
    palette = Image.fromarray(label, mode="P")
    palette.putpalette(DAVIS_PALETTE)
    palette.save(root / "gt" / f"{name}.png")


def test_davis_palette_masks_are_read_like_the_official_loader(tmp_path):
    label = _object_label()
    _write_davis(tmp_path, "x", label)
    assert Image.open(tmp_path / "gt" / "x.png").mode == "P"  # a real palette PNG
    assert detect_layout(tmp_path) == "davis"
    (sample,) = load_samples(tmp_path)
    # Every object pixel (dark red, not a grey 255) is object; nothing is "ignore".
    assert np.array_equal(sample.gt, label.astype(np.int8))


def test_berkeley_masks_are_read_like_grabcut(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "x.jpg"), np.zeros((20, 30, 3), np.uint8))
    label = _object_label() * 255
    label[4, 5:25] = 128  # the ignore band the GrabCut-style readers keep
    Image.fromarray(np.dstack([label] * 3), mode="RGB").save(tmp_path / "masks" / "x.png")
    assert detect_layout(tmp_path) == "berkeley"
    (sample,) = load_samples(tmp_path)
    assert sample.gt.shape == (20, 30)
    assert np.array_equal(sample.gt == 1, _object_label() == 1)
    assert (sample.gt == -1).sum() == 20


def test_one_failing_image_is_reported_and_the_run_goes_on(tmp_path, capsys):
    data = tmp_path / "davis"
    data.mkdir()
    image = np.full((40, 60, 3), (40, 120, 40), np.uint8)
    image[10:30, 15:45] = (200, 40, 40)
    label = np.zeros((40, 60), np.uint8)
    label[10:30, 15:45] = 1
    _write_davis(data, "a_good", label)
    cv2.imwrite(str(data / "img" / "a_good.jpg"), image[..., ::-1])
    _write_davis(data, "b_empty", np.zeros((40, 60), np.uint8))  # no object: unreadable GT
    _write_davis(data, "c_broken", label)
    (data / "img" / "c_broken.jpg").write_bytes(b"not an image")  # fails at the first click
    _write_davis(data, "d_good", label)
    cv2.imwrite(str(data / "img" / "d_good.jpg"), image[..., ::-1])
    out = tmp_path / "out"
    argv = ["eval", "--model", "grabcut", "--dataset", str(data), "--max-clicks", "2"]
    code = main([*argv, "--out", str(out), "--progressive", "off"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "failed: grabcut (plain) b_empty.jpg: ValueError: mask b_empty.png has no object" in (
        printed
    )
    assert "failed: grabcut (plain) c_broken.jpg: click 1:" in printed
    with (out / "grabcut_plain_davis_ious.csv").open() as handle:
        rows = {r[2]: r for r in list(csv.reader(handle))[1:]}
    assert set(rows) == {"a_good.jpg", "b_empty.jpg", "c_broken.jpg", "d_good.jpg"}
    assert rows["b_empty.jpg"][3] and rows["c_broken.jpg"][3]
    assert rows["a_good.jpg"][3] == "" and float(rows["d_good.jpg"][5]) > 0.8
    (table_row,) = [line.split() for line in printed.splitlines() if line.startswith("grabcut")]
    assert table_row[-1] == "2"  # the "failed" column


def test_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known dataset layout"):
        detect_layout(tmp_path)


def test_eval_refine_from_a_coarse_mask_beats_one_click_from_scratch(grabcut_dir, capsys):
    """``tapmask eval --refine-from``: GrabCut on 6 GrabCut images, a mask dilated or eroded by
    15 px plus one corrective click ends above one click from scratch (on all 50: 0.862 / 0.860
    vs 0.649)."""
    from backends.engine import Engine
    from backends.evaluation.refine import evaluate_refine, summarise_refine

    engine = Engine()
    engine.load(["grabcut"])
    samples = list(load_samples(grabcut_dir, limit=6))
    for mode in ("dilate15", "erode15"):
        summary = summarise_refine(evaluate_refine(engine, "grabcut", samples, mode))
        assert summary["images"] == 6 and summary["failed"] == 0
        assert summary["refined"] > summary["scratch"] + 0.1
        assert summary["refined"] > summary["coarse"]
    assert (
        main(
            [
                "eval",
                "--model",
                "grabcut",
                "--dataset",
                str(grabcut_dir),
                "--limit",
                "2",
                "--refine-from",
                "dilate15",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dilate15" in out and "refined" in out


def test_eval_refine_mode_must_be_dilate_or_erode(grabcut_dir):
    with pytest.raises(SystemExit):
        main(
            ["eval", "--model", "grabcut", "--dataset", str(grabcut_dir), "--refine-from", "blur3"]
        )
