"""The detector's job on the shared worker pool: its request and reply codecs (both sides).

A ``DetectJob`` goes to the detector's ``batch`` queue (pre-annotation is batch work: clicks on
the interactive queues overtake it) and names ``protocol.DETECT_JOB``. Like every job it carries
the image's Redis key, never the bytes, and is checked on the worker before any work starts: the
phrases against ``TAPMASK_MAX_TEXT_PROMPTS`` / ``TAPMASK_MAX_TEXT_PROMPT_CHARS``, the thresholds
in [0, 1]. The worker answers the boxes as plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.errors import PromptError, WorkerReplyError
from backends.models.detection import Detection, Thresholds, check_prompts
from backends.prompts import Box
from backends.redis.protocol import (
    PROTOCOL_VERSION,
    check_image_key,
    check_model_name,
    ok_reply,
    request_dict,
)


@dataclass(frozen=True)
class DetectJob:
    """Detector ``detector``'s boxes for ``prompts`` on the image stored under ``image``."""

    detector: str
    image: str
    prompts: tuple[str, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_payload(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "model": self.detector,  # "model": the name every job's queue and log line use
            "image": self.image,
            "prompts": list(self.prompts),
            "box_threshold": self.thresholds.box,
            "text_threshold": self.thresholds.text,
        }

    @classmethod
    def from_payload(cls, data: Any) -> DetectJob:
        data = request_dict(data)
        detector = check_model_name(data.get("model"))
        image = check_image_key(data.get("image"))
        prompts = data.get("prompts")
        if not isinstance(prompts, list):
            raise PromptError("the job's prompts must be a list of phrases")
        thresholds = Thresholds(data.get("box_threshold"), data.get("text_threshold"))
        return cls(detector, image, tuple(check_prompts(prompts)), thresholds)


def detections_reply(detections: list[Detection], worker: str) -> dict[str, Any]:
    return ok_reply(
        worker,
        detections=[
            {"prompt": d.prompt_index, "box": list(d.box.as_xyxy()), "score": d.score}
            for d in detections
        ],
    )


def parse_detections_reply(payload: dict[str, Any], prompts: int) -> list[Detection]:
    """The worker's boxes; a phrase index outside the ``prompts`` sent is a malformed reply."""
    try:
        found = []
        for item in payload["detections"]:
            index = int(item["prompt"])
            if not 0 <= index < prompts:
                raise ValueError(f"phrase index {index} of {prompts}")
            box = Box(*(float(v) for v in item["box"]))
            found.append(Detection(index, box, float(item["score"])))
        return found
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkerReplyError(f"malformed detection reply from the worker: {exc}") from exc
