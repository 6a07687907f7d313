"""Boxes → masks on a segmentation benchmark: how much better a mask is than the box it came from.

``tapmask eval-boxes --dataset DIR [--model grabcut]``: for every image, the ground truth's tight
box (its object pixels') goes through pre-annotation's ``boxes_to_masks`` (the same code as
``tapmask annotate --mode boxes``: the segmenter's box prompt) and the mask is scored against the
ground truth, beside the box itself filled in. IoU excludes the ignore band (label 128) as NoC
does. An image whose mask comes out empty counts with IoU 0 and is listed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends import masks
from backends.dispatch import Dispatcher, LocalDispatcher
from backends.engine import Engine
from backends.evaluation.clicker import iou
from backends.evaluation.datasets import load_samples
from backends.preannotate import boxes_to_masks
from backends.prompts import Box


@dataclass(frozen=True)
class BoxScore:
    name: str
    mask_iou: float  # 0 when the mask came out empty
    box_iou: float  # the box itself, filled
    has_mask: bool


def filled_box(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    filled = np.zeros(shape, bool)
    filled[y1 : y2 + 1, x1 : x2 + 1] = True
    return filled


def evaluate_boxes(
    dataset: str | Path, dispatcher: Dispatcher, model: str, limit: int | None = None
) -> list[BoxScore]:
    scores = []
    for sample in load_samples(dataset, limit):
        box = masks.mask_bbox(sample.gt == 1)
        assert box is not None  # load_samples refuses a mask without object pixels
        found = boxes_to_masks(dispatcher, model, sample.image_bytes, [("object", Box(*box))])
        mask = found[0].mask if found else np.zeros(sample.gt.shape, bool)
        scores.append(
            BoxScore(
                sample.name,
                iou(sample.gt, mask),
                iou(sample.gt, filled_box(sample.gt.shape, box)),
                bool(found),
            )
        )
    return scores


def report(scores: list[BoxScore], model: str) -> str:
    masked = sum(s.has_mask for s in scores)
    lines = [
        f"{model}: boxes → masks on {len(scores)} images, ground-truth tight boxes",
        f"  images with a mask   {masked}/{len(scores)}",
        f"  mean IoU, mask       {np.mean([s.mask_iou for s in scores]):.3f}",
        f"  mean IoU, filled box {np.mean([s.box_iou for s in scores]):.3f}",
        f"  mask beats its box   {sum(s.mask_iou > s.box_iou for s in scores)}/{len(scores)}",
    ]
    lines += [f"  no mask: {s.name}" for s in scores if not s.has_mask]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    engine = Engine()
    engine.load([args.model], **({"checkpoint": args.checkpoint} if args.checkpoint else {}))
    dispatcher = LocalDispatcher(engine)
    try:
        print(report(evaluate_boxes(args.dataset, dispatcher, args.model, args.limit), args.model))
    finally:
        dispatcher.close()
    return 0
