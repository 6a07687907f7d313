"""A Label Studio task → its pre-annotation (a prediction of brush and/or polygon regions).

Shared by ``tapmask annotate`` (which posts it through the REST API) and the backend's "Retrieve
predictions" (``/predict`` without context, which returns it). Tool-neutral work is
``backends.preannotate``'s; this module only reads Label Studio's task and label config and
writes Label Studio's regions:

* **text** mode prompts the detector with the labels of the project's brush/polygon controls
  (each label's prompt text: ``--prompt Label=text``, ``TAPMASK_LABEL_PROMPTS``, else its name);
* **boxes** mode turns every rectangle of the task's annotations and predictions (duplicates,
  such as an annotation accepted from a prediction, once) into a mask of the same label, the
  rectangle converted exactly as a smart rectangle is (rotation, declared size);
* each mask becomes one region per output control that defines its label (brush RLE, polygon
  percent points), drawn at the decoded image's size, with the instance's ``score``; the
  prediction's ``score`` is the lowest region score (0 when nothing was found), so the Data
  Manager sorts the tasks that most need a look first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backends import images
from backends.dispatch import Dispatcher
from backends.errors import InvalidRequest, LabelConfigError
from backends.labelstudio.frames import frame_for
from backends.labelstudio.labelconfig import OUTPUT_TYPES, Control, LabelConfig
from backends.labelstudio.predict import object_request, region_value, to_prompt
from backends.models.detection import Thresholds
from backends.preannotate import Instance, boxes_to_masks, label_prompts, text_to_masks
from backends.prompts import Box

MODES = ("text", "boxes")
FORMATS = {
    "brush": ("brushlabels",),
    "polygon": ("polygonlabels",),
    "both": ("brushlabels", "polygonlabels"),
}
MODEL_VERSION_CHARS = 200


@dataclass(frozen=True)
class Preannotation:
    """How to pre-annotate: ``mode`` (text / boxes), the segmenter, the detector (text mode),
    per-label prompt overrides, detector thresholds and the region formats."""

    mode: str
    model: str
    detector: str | None = None
    prompts: Mapping[str, str] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    formats: tuple[str, ...] = FORMATS["brush"]
    polygon_tolerance: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"pre-annotation mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "text" and not self.detector:
            raise InvalidRequest("text mode needs a detector (--detector, TAPMASK_DETECTOR)")
        if not self.formats or not set(self.formats) <= set(OUTPUT_TYPES):
            raise InvalidRequest(f"region formats must be among {sorted(OUTPUT_TYPES)}")

    def outputs(self, config: LabelConfig, to_name: str) -> list[Control]:
        return [c for c in config.controls if c.type in self.formats and c.to_name == to_name]

    def label_prompts(self, config: LabelConfig, to_name: str) -> dict[str, str]:
        labels = list(dict.fromkeys(v for c in self.outputs(config, to_name) for v in c.labels))
        return label_prompts(labels, self.prompts)

    def model_version(self, config: LabelConfig) -> str:
        """``tapmask boxes grabcut brush``, ``tapmask text sam2.1-hiera-tiny+grounding-dino-tiny
        brush Car=car . truck; Person=Person @0.35/0.25``: what made the prediction, so a re-run
        of the same settings skips a task that holds one and other settings do not. Over 200
        characters it is cut and ends in a hash of the whole."""
        kinds = "+".join(kind.removesuffix("labels") for kind in self.formats)
        if self.mode == "boxes":
            return f"tapmask boxes {self.model} {kinds}"
        prompts = {
            label: text
            for to_name in config.images
            for label, text in self.label_prompts(config, to_name).items()
        }
        said = "; ".join(f"{label}={text}" for label, text in prompts.items())
        version = (
            f"tapmask text {self.model}+{self.detector} {kinds} {said} "
            f"@{self.thresholds.box:g}/{self.thresholds.text:g}"
        )
        if len(version) > MODEL_VERSION_CHARS:
            digest = hashlib.sha1(version.encode()).hexdigest()[:12]
            version = f"{version[: MODEL_VERSION_CHARS - 15]}… #{digest}"
        return version


def check_config(plan: Preannotation, config: LabelConfig) -> list[str]:
    """The images of ``config`` that have an output control of the plan's formats, or 422."""
    names = [name for name in config.images if plan.outputs(config, name)]
    if not names:
        wanted = " or ".join(OUTPUT_TYPES[f] for f in plan.formats)
        raise LabelConfigError(f"the project's label config has no {wanted} on an image")
    return names


def _image_url(task: dict[str, Any], config: LabelConfig, to_name: str) -> str:
    key = config.image_key(to_name)
    data = task.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
        raise InvalidRequest(f"task {task.get('id')} has no image URL in data.{key}")
    return data[key]


def task_rectangles(task: dict[str, Any], to_name: str) -> list[dict[str, Any]]:
    """Every rectangle on image ``to_name`` in the task's annotations (not cancelled ones) and
    predictions, each once."""
    sources = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    sources += list(task.get("predictions") or [])
    found: dict[str, dict[str, Any]] = {}
    for source in sources:
        for item in source.get("result") or []:
            if (
                isinstance(item, dict)
                and item.get("type") == "rectanglelabels"
                and item.get("to_name") == to_name
                and isinstance(item.get("value"), dict)
            ):
                key = repr(sorted((k, repr(v)) for k, v in item["value"].items()))
                found.setdefault(key, item)
    return list(found.values())


def _boxes(rects: list[dict[str, Any]], image: bytes) -> list[tuple[str, Box]]:
    *_, orientation = images.header(image)
    height, width = images.size(image)
    boxes = []
    for rect in rects:
        obj = object_request(rect, [("rectangle", rect["value"], True)])
        frame = frame_for(obj.original_width, obj.original_height, height, width, orientation)
        box = to_prompt(obj, frame).box
        if obj.label is not None and box is not None:
            boxes.append((obj.label, box))
    return boxes


def instance_regions(
    plan: Preannotation,
    config: LabelConfig,
    task_id: Any,
    to_name: str,
    instances: list[Instance],
) -> list[dict[str, Any]]:
    """Label Studio regions for ``instances`` on image ``to_name``: one per output control of
    the plan's formats that defines the instance's label."""
    regions = []
    for index, instance in enumerate(instances):
        height, width = instance.mask.shape
        for control, label in config.outputs_for(to_name, instance.label):
            if control.type not in plan.formats:
                continue
            value = region_value(instance.mask, control.type, label, plan.polygon_tolerance)
            if value is None:
                continue
            ident = hashlib.sha1(repr((task_id, to_name, control.name, index)).encode())
            regions.append(
                {
                    "id": ident.hexdigest()[:10],
                    "from_name": control.name,
                    "to_name": to_name,
                    "type": control.type,
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "score": instance.score,
                    "readonly": False,
                    "value": value,
                }
            )
    return regions


def task_prediction(
    dispatcher: Dispatcher,
    plan: Preannotation,
    config: LabelConfig,
    task: dict[str, Any],
    fetch: Callable[[str], bytes],
) -> dict[str, Any]:
    """The task's prediction: ``{"result": regions, "score": lowest region score,
    "model_version": …}``. ``task`` must be the full task (annotations and predictions) in
    boxes mode; ``fetch`` turns a task's image URL into bytes."""
    regions: list[dict[str, Any]] = []
    for to_name in check_config(plan, config):
        if plan.mode == "boxes":
            rects = task_rectangles(task, to_name)
            if not rects:
                continue
            image = fetch(_image_url(task, config, to_name))
            instances = boxes_to_masks(dispatcher, plan.model, image, _boxes(rects, image))
        else:
            image = fetch(_image_url(task, config, to_name))
            assert plan.detector is not None
            instances = text_to_masks(
                dispatcher,
                plan.model,
                plan.detector,
                image,
                plan.label_prompts(config, to_name),
                plan.thresholds,
            )
        regions += instance_regions(plan, config, task.get("id"), to_name, instances)
    score = min((r["score"] for r in regions), default=0.0)
    return {"result": regions, "score": score, "model_version": plan.model_version(config)}
