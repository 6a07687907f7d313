"""CVAT's detector wire format: text-prompted masks for "Automatic annotation" over a task.

A detector function (``metadata.annotations.type: detector``) lists its labels in
``metadata.annotations.spec``; CVAT maps them to the task's labels by name (or the user's
mapping) and calls the function once per frame. What follows was read in CVAT's source
(``cvat/apps/lambda_manager/views.py``, cvat-ai/cvat ``e4c12a27``: ``LambdaFunction.invoke`` and
``LambdaJob._call_detector.parse_anno``):

* Request: ``{"image": "<base64 of the frame file>", "threshold": 0.5}``; ``threshold`` only when
  the user set one (``invoke`` sends it only when truthy, so 0 never arrives).
* Reply: a JSON **list**, one item per object: ``{"label": name, "confidence": "0.93", "type":
  "mask" | "polygon" | …, "points": [...], "mask": [...], "attributes"?: [...]}``. CVAT drops an
  item whose label it cannot map; it reads ``type``, ``points``, ``mask`` (and ``attributes``,
  ``group_id``, ``rotation``, ``outside``), never ``confidence`` (the stock functions send it as
  a string; so does this one).
* ``type: "mask"``: ``mask`` is the crop of the object's inclusive bounding box, row by row as
  one flat 0/1 list, followed by ``[xtl, ytl, xbr, ybr]``; CVAT cuts the last four off and
  run-length encodes the rest (``mask_tools.mask_to_rle``). When the user ticks "convert masks to
  polygons" (``conv_mask_to_poly``) and the item has ``points``, CVAT stores the polygon
  ``points`` instead: a flat ``[x1, y1, x2, y2, …]`` list in image pixels.
* ``type: "polygon"``: ``points`` only, the same flat list.

This module answers ``mask`` items (with ``points``, the largest outer polygon, so the
conversion works) for labels declared ``mask``, and ``polygon`` items for labels declared
``polygon``. The labels, with their types, reach the handler in ``TAPMASK_DETECTOR_LABELS``
(written into ``function.yaml`` from the same table as ``spec``,
``serverless/generate.py``); each label's prompt text is its name unless
``TAPMASK_LABEL_PROMPTS`` overrides it; the detector is ``TAPMASK_DETECTOR``, its thresholds
``TAPMASK_BOX_THRESHOLD`` / ``TAPMASK_TEXT_THRESHOLD`` (``backends.preannotate.settings``), the
request's ``threshold`` replacing the box threshold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends import masks
from backends.cvat import formats
from backends.dispatch import Dispatcher
from backends.errors import ModelLoadError
from backends.models.detection import Thresholds
from backends.preannotate import Instance, label_prompts, text_to_masks, thresholds_from_env
from backends.prompts import short_repr

ENV_LABELS = "TAPMASK_DETECTOR_LABELS"
#: Label types this detector answers in (CVAT also knows rectangle, points, skeleton…).
LABEL_TYPES = ("mask", "polygon")


@dataclass(frozen=True)
class DetectorLabel:
    name: str
    type: str = "mask"


@dataclass(frozen=True)
class DetectorConfig:
    """What a detector function answers: its labels, their prompt texts, the thresholds."""

    labels: tuple[DetectorLabel, ...]
    prompts: Mapping[str, str]
    thresholds: Thresholds

    @property
    def types(self) -> dict[str, str]:
        return {label.name: label.type for label in self.labels}


def labels_json(labels: Sequence[DetectorLabel]) -> str:
    """``TAPMASK_DETECTOR_LABELS``: ``[{"name": …, "type": …}, …]`` (the generator writes it)."""
    return json.dumps([{"name": label.name, "type": label.type} for label in labels])


def parse_labels(raw: str) -> tuple[DetectorLabel, ...]:
    """``TAPMASK_DETECTOR_LABELS`` → labels; ``ModelLoadError`` (a failed deploy) if unusable."""
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise ModelLoadError(f"{ENV_LABELS} is not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise ModelLoadError(f'{ENV_LABELS} must be a non-empty list of {{"name", "type"}}')
    labels = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        kind = item.get("type", "mask") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip() or kind not in LABEL_TYPES:
            raise ModelLoadError(
                f"{ENV_LABELS}: {short_repr(item)} is not a label "
                f'{{"name": text, "type": {" | ".join(LABEL_TYPES)}}}'
            )
        labels.append(DetectorLabel(name, kind))
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{ENV_LABELS}: label names must be unique (CVAT maps them by name)")
    return tuple(labels)


def config_from_env(environ: Mapping[str, str]) -> DetectorConfig:
    raw = environ.get(ENV_LABELS, "").strip()
    if not raw:
        raise ModelLoadError(f"a detector function needs its labels in {ENV_LABELS}")
    labels = parse_labels(raw)
    try:
        prompts = label_prompts([label.name for label in labels])
        thresholds = thresholds_from_env()
    except Exception as exc:  # a bad TAPMASK_LABEL_PROMPTS / threshold: fail the deploy
        raise ModelLoadError(f"detector settings: {exc}") from exc
    return DetectorConfig(labels, prompts, thresholds)


@dataclass(frozen=True)
class DetectorRequest:
    image: bytes
    threshold: float | None = None


def parse_detector_request(data: Mapping[str, Any]) -> DetectorRequest:
    threshold = formats.parse_threshold(data.get("threshold"))
    return DetectorRequest(formats.decode_image(data.get("image")), threshold)


def detect(
    dispatcher: Dispatcher,
    model: str,
    detector: str,
    config: DetectorConfig,
    request: DetectorRequest,
) -> list[Instance]:
    """One frame: every label's prompt through the detector, one mask per box."""
    thresholds = config.thresholds
    if request.threshold is not None:
        thresholds = Thresholds(request.threshold, thresholds.text)
    return text_to_masks(dispatcher, model, detector, request.image, config.prompts, thresholds)


def detector_reply(instances: Sequence[Instance], config: DetectorConfig) -> str:
    """The JSON list CVAT's ``_call_detector`` reads (module docstring), best score first."""
    types = config.types
    items = []
    for instance in instances:
        polygon = masks.largest_polygon(instance.mask)
        points = [round(v) for vertex in polygon for v in vertex] if len(polygon) >= 3 else None
        head: dict[str, Any] = {"confidence": f"{instance.score:.4f}", "label": instance.label}
        if types.get(instance.label, "mask") == "polygon":
            if points is not None:
                items.append(formats.dumps({**head, "type": "polygon", "points": points}))
            continue
        item = formats.dumps({**head, "type": "mask", **({"points": points} if points else {})})
        items.append(f'{item[:-1]},"mask":{masks.mask_to_cvat_detector_json(instance.mask)}}}')
    return "[" + ",".join(items) + "]"
