"""Pre-annotation settings: which detector, its thresholds, and each label's prompt text.

* ``TAPMASK_DETECTOR`` (default ``grounding-dino-tiny``): the detector of text mode;
* ``TAPMASK_BOX_THRESHOLD`` / ``TAPMASK_TEXT_THRESHOLD`` (default 0.35 / 0.25, Grounding DINO's
  published demo values);
* ``TAPMASK_LABEL_PROMPTS``: a JSON object, label → prompt text (``{"Car": "car . truck"}``);
  ``--prompt Label=text`` on the command line wins over it. A label without one is prompted by
  its own name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

from backends.errors import InvalidRequest, UnknownLabel
from backends.models.detection import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD, Thresholds

DEFAULT_DETECTOR = "grounding-dino-tiny"


def detector_name() -> str:
    return os.environ.get("TAPMASK_DETECTOR", "").strip() or DEFAULT_DETECTOR


def thresholds_from_env() -> Thresholds:
    """``TAPMASK_BOX_THRESHOLD`` / ``TAPMASK_TEXT_THRESHOLD`` (``InvalidRequest`` if unusable)."""
    values = []
    for name, default in (
        ("TAPMASK_BOX_THRESHOLD", DEFAULT_BOX_THRESHOLD),
        ("TAPMASK_TEXT_THRESHOLD", DEFAULT_TEXT_THRESHOLD),
    ):
        raw = os.environ.get(name, "").strip()
        try:
            values.append(float(raw) if raw else default)
        except ValueError:
            raise InvalidRequest(f"{name}={raw!r}: expected a number in [0, 1]") from None
    return Thresholds(*values)


def parse_prompt_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["Car=car . truck", "Person=person"]`` → ``{"Car": "car . truck", …}``."""
    overrides: dict[str, str] = {}
    for item in items:
        label, sep, text = item.partition("=")
        if not sep or not label.strip() or not text.strip():
            raise InvalidRequest(f"prompt {item[:80]!r}: expected Label=prompt text")
        overrides[label.strip()] = text.strip()
    return overrides


def env_prompt_overrides() -> dict[str, str]:
    raw = os.environ.get("TAPMASK_LABEL_PROMPTS", "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"TAPMASK_LABEL_PROMPTS is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise InvalidRequest('TAPMASK_LABEL_PROMPTS must be a JSON object {"Label": "text"}')
    return data


def label_prompts(
    labels: Sequence[str], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each label's prompt text: ``overrides``, else ``TAPMASK_LABEL_PROMPTS``, else the label.

    An override for a label the project does not have is refused (a typo would silently
    prompt nothing)."""
    merged = {**env_prompt_overrides(), **(overrides or {})}
    unknown = sorted(set(overrides or {}) - set(labels))
    if unknown:
        raise UnknownLabel(
            f"prompt override for unknown label(s) {unknown}; the labels are {list(labels)}"
        )
    return {label: merged.get(label, label) for label in labels}
