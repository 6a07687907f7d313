"""`tapmask eval`: the NoC protocol over dataset folders, with CSV curves and a PNG plot."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

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
    assert "NoC@85" in printed and "NoC@90" in printed and ">=3@90" in printed
    assert "s/click" in printed
    with (out / "grabcut_GrabCut_ious.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["model", "image", "iou_1", "iou_2", "iou_3"]
    assert len(rows) == 4 and all(len(r) == 5 for r in rows[1:])
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[2:])
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


@pytest.mark.parametrize(
    ("layout", "images", "masks", "suffix"),
    [("berkeley", "images", "masks", ".png"), ("davis", "img", "gt", ".png")],
)
def test_other_dataset_layouts(tmp_path, layout, images, masks, suffix):
    (tmp_path / images).mkdir()
    (tmp_path / masks).mkdir()
    image = np.zeros((20, 30, 3), np.uint8)
    label = np.zeros((20, 30), np.uint8)
    label[5:15, 5:25] = 255
    cv2.imwrite(str(tmp_path / images / "x.jpg"), image)
    cv2.imwrite(str(tmp_path / masks / f"x{suffix}"), label)
    assert detect_layout(tmp_path) == layout
    (sample,) = load_samples(tmp_path)
    assert sample.gt.shape == (20, 30) and sample.gt.sum() == 200


def test_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known dataset layout"):
        detect_layout(tmp_path)
