"""What a project's labeling config says: which image, which output controls, which labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

from defusedxml import ElementTree

from backends.errors import LabelConfigError

OUTPUT_TYPES = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}
SMART_TYPES = {"keypointlabels", "rectanglelabels"}


@dataclass(frozen=True)
class Control:
    name: str
    type: str  # lower-case result type: brushlabels, polygonlabels, keypointlabels, …
    to_name: str
    labels: tuple[str, ...]


@dataclass
class LabelConfig:
    images: dict[str, str] = field(default_factory=dict)  # Image tag name → task data key
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
            elif tag.lower() in OUTPUT_TYPES or tag.lower() in SMART_TYPES:
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
        """Brush/polygon controls on image ``to_name`` that hold ``label``, with the label to use.

        Label Studio drops errors from interactive calls silently, so when no output control
        holds a label of the same name the clicked label goes into the first one on that image
        (what Label Studio's own example backends do) rather than nothing happening.
        """
        outputs = [c for c in self.controls if c.type in OUTPUT_TYPES and c.to_name == to_name]
        if not outputs:
            raise LabelConfigError(
                f"label_config has no BrushLabels or PolygonLabels for image {to_name!r}"
            )
        if label is None:
            return [(outputs[0], outputs[0].labels[0])] if outputs[0].labels else []
        matching = [(c, label) for c in outputs if label in c.labels]
        return matching or [(outputs[0], label)]
