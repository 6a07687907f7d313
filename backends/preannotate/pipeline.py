"""Pre-annotation, tool-neutral: boxes → masks, and text → boxes → masks.

Both run through a ``Dispatcher`` (``backends.dispatch``), so the same code pre-annotates in this
process or on the shared Redis worker pool, where detections and segments go to the ``batch``
queues that annotators' clicks overtake. Nothing here imports torch.

* ``boxes_to_masks``: each ``(label, box)`` becomes one mask through the segmenter's box prompt
  (SAM's box, GrabCut's rectangle initialisation): for projects boxed before SAM existed.
* ``text_to_masks``: each label's prompt text (``"car . truck"``, default the label's own name)
  is split into phrases; the detector finds boxes per phrase; overlapping boxes of one label are
  merged by non-maximum suppression; then each box becomes a mask as above.

Scores, in [0, 1]: a box → mask instance scores the segmenter's own score (SAM: predicted IoU;
GrabCut: its share of sure pixels); a text instance scores detector score × mask score, so a
confident box with a doubtful mask and a doubtful box both sort low. A box whose mask comes out
empty is dropped (logged), never returned as an empty region.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from backends.dispatch import Dispatcher
from backends.errors import TooManyInstances
from backends.models.detection import Detection, Thresholds, check_prompts, split_phrases
from backends.prompts import Box, Prompt
from backends.settings import MAX_INSTANCES

log = logging.getLogger(__name__)

#: Boxes of one label overlapping more than this (IoU) count as one object: the best one stays.
DEFAULT_NMS_IOU = 0.5


@dataclass(eq=False)
class Instance:
    """One pre-annotated object: its label, full-image H×W boolean mask, score in [0, 1] and the
    box it came from (image pixels, corners inclusive)."""

    label: str
    mask: np.ndarray = field(repr=False)
    score: float
    box: Box

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self.score = min(1.0, max(0.0, float(self.score)))


def _mask_of(
    dispatcher: Dispatcher, model: str, image: bytes, label: str, box: Box
) -> tuple[np.ndarray, float] | None:
    seg = dispatcher.segment(model, image, Prompt(box=box), batch=True)
    if seg.area == 0:
        log.info("%s: the %s box %s gave an empty mask; dropped", model, label, box.as_xyxy())
        return None
    return seg.mask, seg.score


def boxes_to_masks(
    dispatcher: Dispatcher, model: str, image: bytes, boxes: Sequence[tuple[str, Box]]
) -> list[Instance]:
    """One instance per ``(label, box)`` whose mask is not empty, in the given order.

    More boxes than ``TAPMASK_MAX_INSTANCES`` is refused (``TooManyInstances``) before any work.
    """
    limit = int(MAX_INSTANCES)
    if len(boxes) > limit:
        raise TooManyInstances(
            f"{len(boxes)} boxes on one image; at most {limit} (TAPMASK_MAX_INSTANCES)"
        )
    instances = []
    for label, box in boxes:
        found = _mask_of(dispatcher, model, image, label, box)
        if found is not None:
            instances.append(Instance(label, found[0], found[1], box))
    return instances


def phrases_of(label_prompts: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The detector's phrases and, for each, the label it stands for (``{"Car": "car . truck"}``
    → ``(["car", "truck"], ["Car", "Car"])``), checked against the text-prompt limits."""
    phrases: list[str] = []
    labels: list[str] = []
    for label, text in label_prompts.items():
        for phrase in split_phrases(text) or [label]:
            phrases.append(phrase)
            labels.append(label)
    return check_prompts(phrases), labels


def suppress_overlaps(
    detections: Sequence[Detection], labels: Sequence[str], iou: float = DEFAULT_NMS_IOU
) -> list[Detection]:
    """Non-maximum suppression per label (OpenCV's ``NMSBoxes``), best score first."""
    kept: list[Detection] = []
    for label in dict.fromkeys(labels):
        group = [d for d in detections if labels[d.prompt_index] == label]
        if not group:
            continue
        rects = [[b.x1, b.y1, b.x2 - b.x1 + 1, b.y2 - b.y1 + 1] for b in (d.box for d in group)]
        scores = [d.score for d in group]
        indices = cv2.dnn.NMSBoxes(rects, scores, 0.0, iou)
        kept.extend(group[int(i)] for i in np.asarray(indices).reshape(-1))
    return sorted(kept, key=lambda d: -d.score)


def text_to_masks(
    dispatcher: Dispatcher,
    model: str,
    detector: str,
    image: bytes,
    label_prompts: Mapping[str, str],
    thresholds: Thresholds | None = None,
    *,
    nms_iou: float = DEFAULT_NMS_IOU,
) -> list[Instance]:
    """Masks of what each label's prompt text names, best score first.

    ``label_prompts``: label → prompt text (phrases separated by ``.``; an empty text means the
    label's name). At most ``TAPMASK_MAX_INSTANCES`` detections are kept (the best; the rest are
    logged), after per-label non-maximum suppression at ``nms_iou``.
    """
    phrases, labels = phrases_of(label_prompts)
    detections = dispatcher.detect(detector, image, phrases, thresholds)
    detections = suppress_overlaps(detections, labels, nms_iou)
    limit = int(MAX_INSTANCES)
    if len(detections) > limit:
        log.warning(
            "%s found %d objects; keeping the %d best (TAPMASK_MAX_INSTANCES)",
            detector,
            len(detections),
            limit,
        )
        detections = detections[:limit]
    instances = []
    for detection in detections:
        label = labels[detection.prompt_index]
        found = _mask_of(dispatcher, model, image, label, detection.box)
        if found is not None:
            mask, score = found
            instances.append(Instance(label, mask, detection.score * score, detection.box))
    return sorted(instances, key=lambda i: -i.score)
