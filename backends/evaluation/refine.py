"""``tapmask eval --refine-from dilate15``: one corrective click on a coarse pre-annotation vs
one click from scratch.

The question a refining front end answers (Label Studio: a click on a task that already holds a
brush region refines it, ``backends/labelstudio/refine.py``): is a pre-annotation plus one click
better than the click alone? Per image of a benchmark:

1. the pre-annotation: the ground-truth object (``gt == 1``) dilated or eroded by N pixels (an
   elliptical structuring element of radius N), a coarse mask with its error all along the
   boundary;
2. the corrective click: the NoC clicker's next click on that mask (``clicker.next_click``: the
   interior-most pixel of the larger error region, negative for a dilated mask, positive for an
   eroded one);
3. *refined*: the Engine's answer for that click with the pre-annotation as
   ``Prompt.previous_mask``, the path a refining Label Studio click takes;
4. *scratch*: the Engine's answer for the NoC clicker's first click with no mask.

Reported per mode: mean IoU of the pre-annotation, of the refined answer and of the scratch
answer (ignore band excluded, as in NoC), and on how many images refined beats scratch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from backends.engine import Engine
from backends.errors import EmptyMask
from backends.evaluation.clicker import as_click, iou, next_click
from backends.evaluation.datasets import Sample
from backends.prompts import Prompt

_MODE = re.compile(r"^(dilate|erode)(\d{1,3})$")


def parse_mode(text: str) -> tuple[str, int]:
    """``"dilate15"`` → ``("dilate", 15)``; ``ValueError`` for anything else."""
    match = _MODE.match(text)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"{text!r}: expected dilateN or erodeN with N ≥ 1 pixels")
    return match.group(1), int(match.group(2))


def coarse_mask(gt: np.ndarray, mode: str) -> np.ndarray:
    """The ground-truth object dilated or eroded by N pixels (``mode`` as ``parse_mode``)."""
    operation, radius = parse_mode(mode)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    obj = (gt == 1).astype(np.uint8)
    changed = cv2.dilate(obj, kernel) if operation == "dilate" else cv2.erode(obj, kernel)
    return changed.astype(bool)


@dataclass
class RefineResult:
    name: str
    coarse: float = float("nan")  # IoU of the pre-annotation
    refined: float = float("nan")  # pre-annotation + one corrective click
    scratch: float = float("nan")  # one click, no pre-annotation
    error: str | None = None


def _mask_or_empty(engine: Engine, model: str, data: bytes, prompt: Prompt, shape: tuple[int, ...]):
    try:
        return engine.segment(model, data, prompt).mask
    except EmptyMask:
        return np.zeros(shape, bool)


def evaluate_refine_sample(engine: Engine, model: str, sample: Sample, mode: str) -> RefineResult:
    """One image: coarse, refined and scratch IoU (see the module docstring)."""
    result = RefineResult(sample.name)
    if sample.error is not None:
        result.error = sample.error
        return result
    gt = sample.gt
    coarse = coarse_mask(gt, mode)
    try:
        correction = as_click(*next_click(gt, coarse))
        refined = _mask_or_empty(
            engine, model, sample.image_bytes, Prompt((correction,), previous_mask=coarse), gt.shape
        )
        first = as_click(*next_click(gt, np.zeros(gt.shape, bool)))
        scratch = _mask_or_empty(engine, model, sample.image_bytes, Prompt((first,)), gt.shape)
    except Exception as exc:  # reported per sample; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.coarse, result.refined, result.scratch = (
        iou(gt, coarse),
        iou(gt, refined),
        iou(gt, scratch),
    )
    return result


def evaluate_refine(
    engine: Engine, model: str, samples: list[Sample], mode: str
) -> list[RefineResult]:
    results = []
    for sample in tqdm(samples, desc=f"{model} refine from {mode}", unit="img"):
        results.append(evaluate_refine_sample(engine, model, sample, mode))
        engine.images.clear()
        engine.embeddings.clear()
        engine.states.clear()
    return results


def summarise_refine(results: list[RefineResult]) -> dict[str, float]:
    """Mean IoUs (pre-annotation, refined, scratch), images where refined beats scratch, failed."""
    done = [r for r in results if r.error is None]
    summary = {
        key: float(np.mean([getattr(r, key) for r in done])) if done else float("nan")
        for key in ("coarse", "refined", "scratch")
    }
    summary["refined>scratch"] = float(sum(r.refined > r.scratch for r in done))
    summary["images"] = float(len(done))
    summary["failed"] = float(len(results) - len(done))
    return summary


def print_refine_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    """One line per (model, mode): the ``summarise_refine`` figures."""
    print(
        f"{'model':16} {'pre-annotation':>14} {'mIoU pre':>9} {'refined':>9} {'scratch':>9} "
        f"{'ref>scr':>8} {'images':>7} {'failed':>7}"
    )
    for model, mode, s in rows:
        print(
            f"{model:16} {mode:>14} {s['coarse']:9.3f} {s['refined']:9.3f} {s['scratch']:9.3f} "
            f"{s['refined>scratch']:8.0f} {s['images']:7.0f} {s['failed']:7.0f}"
        )
