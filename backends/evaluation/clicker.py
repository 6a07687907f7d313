"""The standard NoC clicker (as in RITM's official evaluation).

The next click goes to the interior-most pixel of the larger error region: exact L2 distance
transform of the false-negative and false-positive maps (each padded by one pixel of background so
the image border counts as a boundary), already-clicked pixels zeroed, a positive click only when
the false-negative maximum is strictly larger (ties give a negative click), and the first pixel in
row-major order that reaches the maximum.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from backends.prompts import Click


def ground_truth_from_label(label: np.ndarray) -> np.ndarray:
    """Label image (255 object, 128 ignore band, 0 background) → int8 map {1, -1, 0}."""
    if label.ndim == 3:
        label = label[..., 0]
    gt = np.zeros(label.shape, dtype=np.int8)
    gt[label == 128] = -1
    gt[label > 128] = 1
    return gt


def _padded_distance(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, ((1, 1), (1, 1)), mode="constant").astype(np.uint8)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(
    gt: np.ndarray, pred_mask: np.ndarray, clicked: Iterable[tuple[int, int]] = ()
) -> tuple[int, int, bool]:
    """The next simulated click as ``(row, col, is_positive)``.

    ``gt``: int8 map with 1 object, 0 background, -1 ignore. ``pred_mask``: boolean prediction.
    ``clicked``: ``(row, col)`` of earlier clicks, which are never chosen again.
    """
    not_ignore = gt != -1
    gt_object = gt == 1
    pred = pred_mask.astype(bool)
    fn_dt = _padded_distance(gt_object & ~pred & not_ignore)
    fp_dt = _padded_distance(~gt_object & pred & not_ignore)
    for row, col in clicked:
        fn_dt[row, col] = 0
        fp_dt[row, col] = 0
    fn_max = fn_dt.max()
    fp_max = fp_dt.max()
    is_positive = bool(fn_max > fp_max)
    chosen = fn_dt if is_positive else fp_dt
    rows, cols = np.where(chosen == (fn_max if is_positive else fp_max))
    return int(rows[0]), int(cols[0]), is_positive


def as_click(row: int, col: int, is_positive: bool) -> Click:
    return Click(x=float(col), y=float(row), positive=is_positive)


def iou(gt: np.ndarray, pred_mask: np.ndarray) -> float:
    """IoU over the pixels that are not ignored (gt != -1)."""
    valid = gt != -1
    obj = (gt == 1) & valid
    pred = pred_mask.astype(bool) & valid
    union = np.logical_or(obj, pred).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(obj, pred).sum() / union)
