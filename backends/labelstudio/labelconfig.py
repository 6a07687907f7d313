"""What a project's labeling config says: which image, which output controls, which labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

from defusedxml import ElementTree

from backends.errors import LabelConfigError, UnknownLabel
from backends.prompts import short_repr

log = logging.getLogger("tapmask.labelstudio")

OUTPUT_TYPES = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}
SMART_TYPES = {"keypointlabels", "rectanglelabels"}
VIDEO_TYPES = {"videorectangle"}
#: Label Studio's ``<Video framerate>`` default (``tags/object/Video/Video.js``).
DEFAULT_FRAMERATE = "24"


@dataclass(frozen=True)
class Control:
    name: str
    type: str  # lower-case result type: brushlabels, polygonlabels, keypointlabels, …
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class VideoTag:
    """A ``<Video>``: its task data key and ``framerate`` (a number or ``$key`` of task data)."""

    name: str
    key: str
    framerate: str = DEFAULT_FRAMERATE


@dataclass
class LabelConfig:
    images: dict[str, str] = field(default_factory=dict)  # Image tag name → task data key
    videos: dict[str, VideoTag] = field(default_factory=dict)
    controls: list[Control] = field(default_factory=list)

    @classmethod
    def parse(cls, xml: str | None) -> LabelConfig:
        if not xml or not xml.strip():
            raise LabelConfigError("label_config is missing")
        try:
            root: Element = ElementTree.fromstring(xml)
        except Exception as exc:  # defusedxml raises several types for hostile input
            raise LabelConfigError(f"label_config is not valid XML: {exc}") from exc
        config = cls()
        for element in root.iter():
            tag = element.tag
            if tag == "Image" and element.get("name"):
                value = element.get("value", "")
                config.images[element.get("name", "")] = value.lstrip("$")
            elif tag == "Video" and element.get("name"):
                name = element.get("name", "")
                # Label Studio lower-cases attribute names: frameRate, framerate, FrameRate.
                attrs = {k.lower(): v for k, v in element.attrib.items()}
                framerate = attrs.get("framerate", "").strip()
                config.videos[name] = VideoTag(
                    name, element.get("value", "").lstrip("$"), framerate or DEFAULT_FRAMERATE
                )
            elif tag.lower() in OUTPUT_TYPES.keys() | SMART_TYPES | VIDEO_TYPES:
                labels = tuple(
                    child.get("value", "") for child in element if child.tag in ("Label", "Choice")
                )
                config.controls.append(
                    Control(element.get("name", ""), tag.lower(), element.get("toName", ""), labels)
                )
        return config

    def image_key(self, to_name: str) -> str:
        try:
            key = self.images[to_name]
        except KeyError:
            raise LabelConfigError(
                f"no <Image name={to_name!r}> in label_config (images: {sorted(self.images)})"
            ) from None
        if not key:
            raise LabelConfigError(f"<Image name={to_name!r}> has no value=$field")
        return key

    def outputs_for(self, to_name: str, label: str | None) -> list[tuple[Control, str]]:
        """The brush/polygon controls on image ``to_name`` to answer in, each with its label.

        A region never carries a label its control does not define (Label Studio would store
        it, and show a label the project does not have). For the clicked ``label``:

        1. the controls that define it, under that name;
        2. else the controls that define it in other letter case (``object`` → ``Object``);
        3. else the controls that define exactly one label, under that label (a one-label
           project segments whatever the smart tool's label is called);
        4. else ``UnknownLabel`` (422), naming the label and every control's labels.

        Steps 2 and 3 log a warning: Label Studio shows the annotator no error, so the log is
        where a mismatched config shows up. No label at all (old clients) takes the first label
        of the first control.
        """
        outputs = [c for c in self.controls if c.type in OUTPUT_TYPES and c.to_name == to_name]
        if not outputs:
            raise LabelConfigError(
                f"label_config has no BrushLabels or PolygonLabels for image {to_name!r}"
            )
        if label is None:
            return [(outputs[0], outputs[0].labels[0])] if outputs[0].labels else []
        exact = [(c, label) for c in outputs if label in c.labels]
        if exact:
            return exact
        folded = label.casefold()
        same_name = [
            (c, matches[0])
            for c in outputs
            if len(matches := [v for v in c.labels if v.casefold() == folded]) == 1
        ]
        only_label = [(c, c.labels[0]) for c in outputs if len(c.labels) == 1]
        chosen, why = (same_name, "the same name") if same_name else (only_label, "its only label")
        if not chosen:
            raise UnknownLabel(
                f"label {short_repr(label)} is not defined by {_describe(outputs)}; add it there, "
                "or give the smart tool's label the name of one of those"
            )
        log.warning(
            "label %s is not defined by %s: answering %s (%s)",
            short_repr(label),
            _describe(outputs),
            ", ".join(f"{c.name}={v!r}" for c, v in chosen),
            why,
        )
        return chosen


def _describe(controls: list[Control]) -> str:
    return ", ".join(
        f"{OUTPUT_TYPES[c.type]} {c.name!r} (labels: {', '.join(c.labels) or 'none'})"
        for c in controls
    )
