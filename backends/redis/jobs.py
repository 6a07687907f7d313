"""The only functions a tapmask worker runs, and the rq job class that refuses anything else.

Jobs are JSON (rq ``JSONSerializer``): a pickled payload cannot even be decoded, and
``TapmaskJob`` refuses any function name outside ``JOB_FUNCTIONS`` (keyed by the names
``backends.redis.protocol`` gives the dispatcher), any bound instance and any callback, before
anything is imported. Each job function parses its request with the protocol's codecs and turns
every failure into an error reply (``TapmaskError`` code + HTTP status), so one poisoned request
fails alone and the worker keeps serving.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from rq import get_current_job
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from backends.engine import Engine
from backends.errors import ImageError, TapmaskError, Timeout, Unavailable, UnknownImage
from backends.images import sha256
from backends.redis import protocol
from backends.redis.preannotation import DetectJob, detections_reply
from backends.redis.protocol import ExportJob, Keys, PrefetchJob, SegmentJob, error_reply
from backends.settings import check_limits

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """What the job functions of this process work with (set once by the worker at start-up)."""

    engine: Engine
    connection: redis.Redis
    keys: Keys
    name: str
    output_ttl: int = 120
    jobs: int = 0
    errors: int = 0


_runtime: WorkerRuntime | None = None


def install(runtime: WorkerRuntime | None) -> None:
    """Make ``runtime`` the one the job functions of this process use.

    An unusable limit setting (``TAPMASK_MAX_CLICKS=lots``) stops the worker here, at start-up.
    """
    global _runtime
    if runtime is not None:
        check_limits()
    _runtime = runtime


def image_ref(rt: WorkerRuntime, key: str) -> bytes | str:
    """The Engine's cached image by key, else the bytes from Redis (checked against the key)."""
    if key in rt.engine.images:
        return key
    data = rt.connection.get(rt.keys.image(key))
    if data is None:
        raise UnknownImage(f"image {key[:12]}… is not in Redis (expired or evicted); resend it")
    protocol.check_image_bytes(data)
    if sha256(data) != key:
        raise ImageError(f"the bytes stored under image {key[:12]}… do not match their hash")
    return data


def _segment(rt: WorkerRuntime, payload: Any) -> dict[str, Any]:
    job = SegmentJob.from_payload(payload)
    result = rt.engine.segment(job.model, image_ref(rt, job.image), job.prompt)
    return protocol.segmentation_reply(result, rt.name)


def _prefetch(rt: WorkerRuntime, payload: Any) -> dict[str, Any]:
    job = PrefetchJob.from_payload(payload)
    rt.engine.prefetch(job.model, image_ref(rt, job.image))
    return protocol.ok_reply(rt.name)


def _export(rt: WorkerRuntime, payload: Any) -> dict[str, Any]:
    job = ExportJob.from_payload(payload)
    array = rt.engine.export_embedding(job.model, image_ref(rt, job.image))
    array = np.ascontiguousarray(array, dtype=job.dtype)
    current = get_current_job()
    key = rt.keys.output(current.id if current is not None else uuid.uuid4().hex)
    rt.connection.set(key, array.tobytes(), ex=rt.output_ttl)
    return protocol.export_reply(rt.name, key, job.dtype, tuple(array.shape))


def _detect(rt: WorkerRuntime, payload: Any) -> dict[str, Any]:
    job = DetectJob.from_payload(payload)
    image = image_ref(rt, job.image)
    found = rt.engine.detect(job.detector, image, list(job.prompts), job.thresholds)
    return detections_reply(found, rt.name)


def _run(handler: Callable[[WorkerRuntime, Any], dict[str, Any]], payload: Any) -> dict[str, Any]:
    rt = _runtime
    if rt is None:
        return error_reply(Unavailable("this process is not a running tapmask worker"))
    rt.jobs += 1
    try:
        return handler(rt, payload)
    except TapmaskError as exc:
        rt.errors += 1
        log.info("job failed: %s (%s)", exc, exc.code)
        return error_reply(exc)
    except JobTimeoutException as exc:
        rt.errors += 1
        return error_reply(Timeout(f"the worker ran past the job timeout: {exc}"))
    except redis.RedisError as exc:
        rt.errors += 1
        return error_reply(Unavailable(f"the worker lost Redis: {exc}"))
    except Exception as exc:  # a bug or a model failure: this request fails, the worker goes on
        rt.errors += 1
        log.exception("job failed unexpectedly")
        return error_reply(TapmaskError(f"{type(exc).__name__}: {exc}"))


def segment_job(request: dict[str, Any]) -> dict[str, Any]:
    """Interactive: the mask for a prompt, as COCO RLE + score + model."""
    return _run(_segment, request)


def prefetch_job(request: dict[str, Any]) -> dict[str, Any]:
    """Batch: compute and cache (locally and in the shared tier) an image's embedding."""
    return _run(_prefetch, request)


def export_job(request: dict[str, Any]) -> dict[str, Any]:
    """Interactive: the raw embedding, written to a short-lived key as raw bytes."""
    return _run(_export, request)


def detect_job(request: dict[str, Any]) -> dict[str, Any]:
    """Batch: a detector's boxes for text prompts (pre-annotation), as plain numbers."""
    return _run(_detect, request)


#: The job functions by the dotted names the dispatcher enqueues (``backends.redis.protocol``).
JOB_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    protocol.SEGMENT_JOB: segment_job,
    protocol.PREFETCH_JOB: prefetch_job,
    protocol.EXPORT_JOB: export_job,
    protocol.DETECT_JOB: detect_job,
}
assert set(JOB_FUNCTIONS) == protocol.JOB_NAMES


class RejectedJob(Exception):
    """A job that names anything but a tapmask job function (it is failed, never run)."""


class TapmaskJob(Job):
    """An rq job that can only resolve to one of ``JOB_FUNCTIONS`` and never runs callbacks."""

    @property
    def func(self):  # type: ignore[override]
        try:
            name = self.func_name
            instance = self.instance
        except DeserializationError as exc:
            raise RejectedJob(f"job {self.id}: payload is not tapmask JSON") from exc
        if instance is not None or name not in JOB_FUNCTIONS:
            raise RejectedJob(f"job {self.id}: {name!r} is not a tapmask job function")
        return JOB_FUNCTIONS[name]

    @property
    def success_callback(self):  # type: ignore[override]
        return None

    @property
    def failure_callback(self):  # type: ignore[override]
        return None

    @property
    def stopped_callback(self):  # type: ignore[override]
        return None
