"""What the front-end side (``RedisDispatcher``) and the workers agree on, in one place.

A click travels as a small JSON job (rq ``JSONSerializer``; nothing is ever pickled):

* the image bytes live once in Redis under ``<ns>:img:<sha256>`` with a TTL; jobs carry the key;
* the job goes to the model's ``<ns>:<model>:interactive`` queue (clicks, embedding exports) or
  its ``<ns>:<model>:batch`` queue (prefetches); rq keeps each queue as the Redis list
  ``rq:queue:<queue name>``;
* it names one of the four job functions of ``backends.redis.jobs`` by dotted path (rq's JSON
  jobs name their function that way); workers refuse every other name;
* its one argument is a request dict (``SegmentJob`` / ``PrefetchJob`` / ``ExportJob`` below,
  ``DetectJob`` in ``backends.redis.preannotation``, with the protocol version ``v``); the
  worker answers ``{"ok": true, …}`` or an error reply ``{"ok": false, "error": code,
  "status": http status, "detail": text}``, which ``error_from_reply`` turns back into the
  same ``TapmaskError`` class.

Everything a job carries is checked here, on the worker side, before any work starts, within
the same documented limits the front ends apply (``backends.settings``): clicks per job
(``TAPMASK_MAX_CLICKS``), a previous mask's pixels (``TAPMASK_MAX_PIXELS``, before it is decoded)
and the image bytes read from Redis (``TAPMASK_MAX_IMAGE_MB``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import masks
from backends.errors import (
    ImageTooLarge,
    InvalidRequest,
    ModelNotFound,
    PromptError,
    RequestTooLarge,
    TapmaskError,
    TooManyClicks,
    WorkerReplyError,
    error_class,
)
from backends.prompts import Prompt, Segmentation
from backends.settings import MAX_CLICKS, MAX_IMAGE_MB, MAX_PIXELS, max_bytes

PROTOCOL_VERSION = 1

#: The module holding the only functions a tapmask worker runs, and their dotted names.
JOBS_MODULE = "backends.redis.jobs"
SEGMENT_JOB = f"{JOBS_MODULE}.segment_job"
PREFETCH_JOB = f"{JOBS_MODULE}.prefetch_job"
EXPORT_JOB = f"{JOBS_MODULE}.export_job"
DETECT_JOB = f"{JOBS_MODULE}.detect_job"
#: The jobs that need their image's embedding (what a worker's encode batcher looks at).
ENCODING_JOB_NAMES = frozenset({SEGMENT_JOB, PREFETCH_JOB, EXPORT_JOB})
#: Every job a worker runs: the encoding ones, and a detector's (``backends.redis.preannotation``).
JOB_NAMES = ENCODING_JOB_NAMES | {DETECT_JOB}

#: Element types an exported embedding may travel in.
EXPORT_DTYPES = ("float16", "float32")

#: rq's prefix of the Redis list behind a queue (``rq.Queue.redis_queue_namespace_prefix``).
RQ_QUEUE_PREFIX = "rq:queue:"
QUEUE_KINDS = ("interactive", "batch")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class Keys:
    """Every Redis key and rq queue name tapmask uses, under one namespace."""

    namespace: str = "tapmask"

    def queue(self, model: str, kind: str) -> str:
        if kind not in QUEUE_KINDS:
            raise ValueError(f"queue kind must be one of {QUEUE_KINDS}, got {kind!r}")
        return f"{self.namespace}:{model}:{kind}"

    def interactive(self, model: str) -> str:
        return self.queue(model, "interactive")

    def batch(self, model: str) -> str:
        return self.queue(model, "batch")

    @staticmethod
    def queue_list(queue: str) -> str:
        """The Redis list rq keeps a queue's waiting job ids in (what autoscalers count)."""
        return RQ_QUEUE_PREFIX + queue

    def parse_queue(self, queue: str) -> tuple[str, str] | None:
        """``(model, kind)`` for one of our queue names (or its rq list), else None."""
        queue = queue.removeprefix(RQ_QUEUE_PREFIX)
        head = f"{self.namespace}:"
        if not queue.startswith(head):
            return None
        model, _, kind = queue[len(head) :].rpartition(":")
        if kind not in QUEUE_KINDS or not _MODEL_NAME.match(model):
            return None
        return model, kind

    def image(self, sha: str) -> str:
        return f"{self.namespace}:img:{sha}"

    def embedding(self, model: str, sha: str) -> str:
        return f"{self.namespace}:emb:{model}:{sha}"

    @property
    def embedding_index(self) -> str:
        return f"{self.namespace}:emb:index"

    @property
    def embedding_sizes(self) -> str:
        return f"{self.namespace}:emb:sizes"

    @property
    def embedding_bytes(self) -> str:
        return f"{self.namespace}:emb:bytes"

    def presence(self, worker: str) -> str:
        return f"{self.namespace}:worker:{worker}"

    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    def output(self, job_id: str) -> str:
        return f"{self.namespace}:out:{job_id}"


def check_model_name(model: Any) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ModelNotFound(f"invalid model name {str(model)[:120]!r}")
    return model


def check_image_key(key: Any) -> str:
    if not isinstance(key, str) or not _SHA256.match(key):
        raise PromptError(f"invalid image key {str(key)[:80]!r}: expected a sha256 hex digest")
    return key


def check_image_bytes(data: bytes) -> bytes:
    """Image bytes read from Redis, within ``TAPMASK_MAX_IMAGE_MB``."""
    limit = max_bytes(MAX_IMAGE_MB)
    if len(data) > limit:
        raise ImageTooLarge(
            f"the job's image is {len(data)} bytes, over the {limit}-byte limit "
            "(TAPMASK_MAX_IMAGE_MB)"
        )
    return data


def _check_prompt(prompt: Any) -> dict[str, Any]:
    """The shape and counts of a job's prompt, before ``Prompt.from_dict`` touches a value."""
    if not isinstance(prompt, dict):
        raise PromptError("the job has no prompt")
    clicks = prompt.get("clicks", [])
    if not isinstance(clicks, list):
        raise PromptError("the job's clicks must be a list of [x, y, positive]")
    limit = int(MAX_CLICKS)
    if len(clicks) > limit:
        raise TooManyClicks(
            f"the job has {len(clicks)} clicks; at most {limit} (TAPMASK_MAX_CLICKS)"
        )
    box = prompt.get("box")
    if box is not None and (not isinstance(box, list) or len(box) != 4):
        raise PromptError("the job's box must be [x1, y1, x2, y2] or null")
    return prompt


def _previous_mask(rle: Any) -> np.ndarray:
    """A job's previous mask (COCO RLE), its size checked against ``TAPMASK_MAX_PIXELS`` and
    its counts against that size before anything is decoded."""
    if not isinstance(rle, dict):
        raise PromptError("previous_mask must be COCO RLE: {size: [h, w], counts}")
    size, counts = rle.get("size"), rle.get("counts")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise PromptError(f"previous_mask size must be [height, width], got {str(size)[:80]}")
    pixels, limit = size[0] * size[1], int(MAX_PIXELS)
    if pixels > limit:
        raise RequestTooLarge(
            f"previous_mask is {size[0]}×{size[1]}, over the {limit}-pixel limit "
            "(TAPMASK_MAX_PIXELS)"
        )
    if not isinstance(counts, (str, list)) or len(counts) > 8 * (pixels + 1):
        raise PromptError("previous_mask counts must be a string or a list of runs")
    try:
        return masks.coco_rle_to_mask(rle)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise PromptError(f"previous_mask: {str(exc)[:200]}") from exc


def check_export_dtype(dtype: Any) -> str:
    if dtype not in EXPORT_DTYPES:
        raise InvalidRequest(f"unsupported export dtype {str(dtype)[:40]!r}: {EXPORT_DTYPES}")
    return str(dtype)


# --------------------------------------------------------------------------------------------
# Requests (dispatcher → worker)


def request_dict(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("v") != PROTOCOL_VERSION:
        raise InvalidRequest(
            f"unsupported job payload (this worker speaks protocol v{PROTOCOL_VERSION})"
        )
    return data


@dataclass(frozen=True)
class SegmentJob:
    """A click (or box) on an image: the mask comes back as COCO RLE."""

    model: str
    image: str
    prompt: Prompt

    def to_payload(self) -> dict[str, Any]:
        payload = {
            "v": PROTOCOL_VERSION,
            "model": self.model,
            "image": self.image,
            "prompt": self.prompt.to_dict(),
        }
        if self.prompt.previous_mask is not None:
            payload["previous_mask"] = masks.mask_to_coco_rle(self.prompt.previous_mask)
        return payload

    @classmethod
    def from_payload(cls, data: Any) -> SegmentJob:
        data = request_dict(data)
        model, image = check_model_name(data.get("model")), check_image_key(data.get("image"))
        parsed = Prompt.from_dict(_check_prompt(data.get("prompt")))
        if data.get("previous_mask") is not None:
            previous = _previous_mask(data["previous_mask"])
            parsed = Prompt(parsed.clicks, parsed.box, previous)
        return cls(model, image, parsed)


@dataclass(frozen=True)
class PrefetchJob:
    """Compute and cache an image's embedding ahead of its first click (batch queue)."""

    model: str
    image: str

    def to_payload(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "model": self.model, "image": self.image}

    @classmethod
    def from_payload(cls, data: Any) -> PrefetchJob:
        data = request_dict(data)
        return cls(check_model_name(data.get("model")), check_image_key(data.get("image")))


@dataclass(frozen=True)
class ExportJob:
    """The model's raw image embedding, written by the worker to a short-lived key."""

    model: str
    image: str
    dtype: str = "float16"

    def to_payload(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "model": self.model,
            "image": self.image,
            "dtype": self.dtype,
        }

    @classmethod
    def from_payload(cls, data: Any) -> ExportJob:
        data = request_dict(data)
        return cls(
            check_model_name(data.get("model")),
            check_image_key(data.get("image")),
            check_export_dtype(data.get("dtype", "float32")),
        )


# --------------------------------------------------------------------------------------------
# Replies (worker → dispatcher)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def ok_reply(worker: str, **fields: Any) -> dict[str, Any]:
    return {"ok": True, "worker": worker, **fields}


def segmentation_reply(result: Segmentation, worker: str) -> dict[str, Any]:
    return ok_reply(
        worker,
        mask=masks.mask_to_coco_rle(result.mask),
        score=float(result.score),
        model=result.model,
        extra=_jsonable(result.extra),
    )


def parse_segmentation_reply(payload: dict[str, Any]) -> Segmentation:
    try:
        mask = masks.coco_rle_to_mask(payload["mask"])
        extra = dict(payload.get("extra") or {})
        if payload.get("worker"):
            extra.setdefault("worker", str(payload["worker"]))
        return Segmentation(
            mask=mask,
            score=float(payload["score"]),
            model=str(payload.get("model", "")),
            extra=extra,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkerReplyError(f"malformed reply from the worker: {exc}") from exc


def export_reply(worker: str, key: str, dtype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return ok_reply(worker, array={"key": key, "dtype": dtype, "shape": list(shape)})


def parse_export_reply(payload: dict[str, Any]) -> tuple[str, np.dtype, tuple[int, ...]]:
    """``(key, dtype, shape)`` of the exported array the worker wrote to Redis."""
    try:
        spec = payload["array"]
        key, shape = str(spec["key"]), tuple(int(v) for v in spec["shape"])
        return key, np.dtype(check_export_dtype(spec["dtype"])), shape
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
        raise WorkerReplyError(f"malformed embedding reply from the worker: {exc}") from exc


def error_reply(exc: TapmaskError) -> dict[str, Any]:
    return {"ok": False, "error": exc.code, "status": int(exc.status), "detail": str(exc)}


def error_from_reply(payload: dict[str, Any]) -> TapmaskError:
    """The worker's error as the same ``TapmaskError`` class (codes are unique), same status.

    A code this version does not know (a newer worker) keeps the worker's code and status.
    """
    code = str(payload.get("error") or TapmaskError.code)
    detail = str(payload.get("detail") or code)
    cls = error_class(code)
    if cls is not None:
        return cls(detail)
    exc = TapmaskError(detail)
    try:
        exc.status = int(payload.get("status", 500))
    except (TypeError, ValueError):
        exc.status = 500
    exc.code = code[:64]
    return exc
