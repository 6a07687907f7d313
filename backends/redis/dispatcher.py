"""``RedisDispatcher``: the front-end side of the shared worker pool (same API as
``LocalDispatcher``; ``TAPMASK_REDIS_URL`` is the whole switch, see ``backends.dispatch``).

* The image bytes go to Redis once, under ``<ns>:img:<sha256>`` with a TTL. A dispatcher that
  stored (or refreshed) an image recently sends only its key, and an ``EXPIRE`` (no bytes) tells
  it whether another process already stored it. A worker that finds the key gone answers
  ``unknown_image`` and the dispatcher resends the bytes once.
* Clicks and embedding exports go to the model's interactive queue, prefetches, detections and
  pre-annotation's segments (``batch=True``) to its batch queue (workers serve every
  interactive queue before any batch queue).
* The caller blocks on rq's result stream (``job.latest_result(timeout=…)``) in one-second
  slices, and between slices checks that the job was picked up (an interactive job nobody takes
  within ``queue_ttl`` seconds is dropped by its rq ``ttl``: 503) and that the worker running it
  is still alive (a worker killed mid-job is noticed within a few seconds and the job is retried
  once on another worker, else 503). Redis unreachable: 503 at once; no answer by the
  deadline: 504.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import suppress
from typing import Any

import numpy as np
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from backends import images
from backends.errors import (
    ModelNotFound,
    TapmaskError,
    Timeout,
    Unavailable,
    WorkerReplyError,
)
from backends.models.detection import Detection, Thresholds, check_prompts
from backends.prompts import Prompt, Segmentation
from backends.redis.connection import (
    connect,
    redis_errors_as_unavailable,
    redis_location,
    redis_url,
)
from backends.redis.preannotation import DetectJob, parse_detections_reply
from backends.redis.presence import is_alive, live_workers
from backends.redis.protocol import (
    DETECT_JOB,
    EXPORT_JOB,
    PREFETCH_JOB,
    SEGMENT_JOB,
    ExportJob,
    Keys,
    PrefetchJob,
    SegmentJob,
    check_export_dtype,
    check_model_name,
    error_from_reply,
    parse_export_reply,
    parse_segmentation_reply,
)

log = logging.getLogger(__name__)

#: A prefetch of the same (model, image) within this many seconds is not enqueued again.
PREFETCH_MEMORY_S = 60.0


class _Expired(Exception):
    pass


class _WorkerLost(Exception):
    pass


class _Dropped(Exception):
    pass


class RedisDispatcher:
    """Front-end side of the shared worker pool: same API as ``LocalDispatcher``.

    ``models``: the names this front end offers (others are 404 here, without a round trip);
    ``None`` forwards any well-formed name and lets the workers decide.
    ``queue_ttl``: seconds an interactive job may wait for a worker before it is dropped (503).
    ``job_timeout``: seconds a worker may spend on one job (rq ``job_timeout``; 504 after it).
    ``grace``: extra seconds the caller waits past queue_ttl + job_timeout before giving up.
    ``dedup_images=False`` stores the image bytes on every request (benchmark baseline).
    """

    def __init__(
        self,
        url: str | None = None,
        models: list[str] | None = None,
        *,
        connection: redis.Redis | None = None,
        namespace: str = "tapmask",
        queue_ttl: float = 5.0,
        job_timeout: float = 60.0,
        grace: float = 2.0,
        result_ttl: int = 60,
        failure_ttl: int = 600,
        image_ttl: int = 3600,
        batch_ttl: int = 3600,
        dedup_images: bool = True,
        retry_lost_jobs: bool = True,
        export_dtype: str = "float16",
        poll_seconds: int = 1,
    ) -> None:
        self.url = redis_url(url)
        self.redis = connection or connect(self.url, socket_timeout=max(5.0, poll_seconds + 4.0))
        self.keys = Keys(namespace)
        self._models = list(models) if models else None
        self.queue_ttl = max(1, math.ceil(queue_ttl))
        self.job_timeout = max(1, math.ceil(job_timeout))
        self.grace = float(grace)
        self.result_ttl = int(result_ttl)
        self.failure_ttl = int(failure_ttl)
        self.image_ttl = int(image_ttl)
        self.batch_ttl = int(batch_ttl)
        self.dedup_images = dedup_images
        self.retry_lost_jobs = retry_lost_jobs
        self.export_dtype = check_export_dtype(export_dtype)
        self.poll_seconds = max(1, int(poll_seconds))
        self._queues: dict[str, Queue] = {}
        self._stored: OrderedDict[str, float] = OrderedDict()  # image sha -> when stored/refreshed
        self._prefetched: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, models: list[str] | None = None) -> RedisDispatcher:
        env = os.environ
        return cls(
            redis_url(),
            models,
            namespace=env.get("TAPMASK_REDIS_NAMESPACE", "tapmask"),
            queue_ttl=float(env.get("TAPMASK_QUEUE_TTL", 5)),
            job_timeout=float(env.get("TAPMASK_JOB_TIMEOUT", 60)),
            image_ttl=int(env.get("TAPMASK_IMAGE_TTL", 3600)),
        )

    # -- Dispatcher API ----------------------------------------------------------------------
    def segment(
        self,
        model: str,
        image: bytes,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        batch: bool = False,
    ) -> Segmentation:
        self._check_model(model)
        payload = self._call(
            SEGMENT_JOB,
            model,
            image,
            lambda sha: SegmentJob(model, sha, prompt).to_payload(),
            timeout,
            kind="batch" if batch else "interactive",
        )
        return parse_segmentation_reply(payload)

    def detect(
        self,
        detector: str,
        image: bytes,
        prompts: list[str],
        thresholds: Thresholds | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Detection]:
        """A ``DetectJob`` on the detector's batch queue (the phrases are checked here first)."""
        self._check_model(detector)
        phrases, cutoffs = tuple(check_prompts(prompts)), thresholds or Thresholds()
        payload = self._call(
            DETECT_JOB,
            detector,
            image,
            lambda sha: DetectJob(detector, sha, phrases, cutoffs).to_payload(),
            timeout,
            kind="batch",
        )
        return parse_detections_reply(payload, len(phrases))

    def prefetch(self, model: str, image: bytes) -> None:
        self._check_model(model)
        with redis_errors_as_unavailable(self._where):
            sha = self._store_image(image)
            key = (model, sha)
            now = time.monotonic()
            with self._lock:
                seen = self._prefetched.get(key)
            if seen is not None and now - seen < PREFETCH_MEMORY_S:
                return  # asked for recently: one prefetch per image is enough
            self._enqueue(
                self.keys.batch(model),
                PREFETCH_JOB,
                PrefetchJob(model, sha).to_payload(),
                ttl=self.batch_ttl,
                result_ttl=0,
            )
            with self._lock:
                self._remember(self._prefetched, key, now)

    def export_embedding(
        self, model: str, image: bytes, *, timeout: float | None = None
    ) -> np.ndarray:
        self._check_model(model)
        payload = self._call(
            EXPORT_JOB,
            model,
            image,
            lambda sha: ExportJob(model, sha, self.export_dtype).to_payload(),
            timeout,
        )
        key, dtype, shape = parse_export_reply(payload)
        with redis_errors_as_unavailable(self._where):
            data = self.redis.getdel(key)
        if data is None:
            raise Unavailable("the exported embedding expired before it was read")
        array = np.frombuffer(data, dtype=dtype)
        if array.size != math.prod(shape):
            raise WorkerReplyError(f"exported embedding has {array.size} values, expected {shape}")
        return array.reshape(shape).astype(np.float32)

    def models(self) -> list[str]:
        if self._models is not None:
            return sorted(self._models)
        with redis_errors_as_unavailable(self._where):
            workers = live_workers(self.redis, self.keys)
        return sorted({m for w in workers for m in w.get("models", [])})

    def stats(self) -> dict[str, dict[str, float]]:
        """Front-end side counters (the caches live in the workers: see ``tapmask workers``)."""
        with self._lock:
            return {
                "redis-images": {"entries": len(self._stored)},
                "redis-prefetches": {"entries": len(self._prefetched)},
            }

    def close(self) -> None:
        self.redis.close()

    # -- internals -----------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return f"Redis ({redis_location(self.redis)})"

    def _check_model(self, model: str) -> None:
        check_model_name(model)
        if self._models is not None and model not in self._models:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {model!r} is not served here (served: {served})")

    @staticmethod
    def _remember(memo: OrderedDict, key: Any, when: float, limit: int = 4096) -> None:
        memo[key] = when
        memo.move_to_end(key)
        while len(memo) > limit:
            memo.popitem(last=False)

    def _store_image(self, data: bytes, *, force: bool = False) -> str:
        """Make sure ``<ns>:img:<sha>`` holds the bytes; send them only when Redis lacks them."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("image must be the file bytes")
        data = bytes(data)
        sha = images.sha256(data)
        key = self.keys.image(sha)
        now = time.monotonic()
        if force or not self.dedup_images:
            self.redis.set(key, data, ex=self.image_ttl)
        else:
            with self._lock:
                seen = self._stored.get(sha)
            if seen is not None and now - seen < self.image_ttl / 4:
                return sha  # stored or refreshed by us recently: the key alone is enough
            if not self.redis.expire(key, self.image_ttl):  # refreshed if present, else send
                self.redis.set(key, data, ex=self.image_ttl, nx=True)
        with self._lock:
            self._remember(self._stored, sha, now)
        return sha

    def _forget_image(self, sha: str) -> None:
        with self._lock:
            self._stored.pop(sha, None)

    def _queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = Queue(name, connection=self.redis, serializer=JSONSerializer)
            self._queues[name] = queue
        return queue

    def _enqueue(
        self,
        queue_name: str,
        func: str,
        request: dict[str, Any],
        *,
        ttl: int,
        result_ttl: int,
        timeout: int | None = None,
    ) -> Job:
        queue = self._queue(queue_name)
        with self.redis.pipeline(transaction=False) as pipe:
            job = queue.enqueue_call(
                func,
                args=(request,),
                timeout=timeout or self.job_timeout,
                result_ttl=result_ttl,
                ttl=ttl,
                failure_ttl=self.failure_ttl,
                description=f"{func.rsplit('.', 1)[-1]} {request['model']} "
                f"{str(request.get('image', ''))[:12]}",
                pipeline=pipe,
            )
            pipe.execute()
        return job

    def _call(
        self,
        func: str,
        model: str,
        image: bytes,
        request_for: Any,
        timeout: float | None,
        *,
        kind: str = "interactive",
    ) -> dict[str, Any]:
        """Store the image, enqueue ``request_for(image_sha)`` on the model's ``kind`` queue and
        wait for the reply (a batch job may wait ``batch_ttl`` for a worker, not ``queue_ttl``)."""
        started = time.monotonic()
        job_timeout = self.job_timeout
        queue_ttl = self.queue_ttl if kind == "interactive" else self.batch_ttl
        if timeout is not None:
            job_timeout = max(1, min(job_timeout, math.ceil(timeout)))
            queue_ttl = max(1, min(queue_ttl, math.ceil(timeout)))
            deadline = started + float(timeout)
        else:
            deadline = started + queue_ttl + job_timeout + self.grace
        resent = retried = False
        with redis_errors_as_unavailable(self._where):
            sha = self._store_image(image)
            while True:
                job = self._enqueue(
                    self.keys.queue(model, kind),
                    func,
                    request_for(sha),
                    ttl=queue_ttl,
                    result_ttl=self.result_ttl,
                    timeout=job_timeout,
                )
                try:
                    payload = self._wait(job, model, deadline)
                except _WorkerLost:
                    if self.retry_lost_jobs and not retried and self._has_live_worker(model):
                        log.warning("a %s worker died during job %s; retrying once", model, job.id)
                        retried = True
                        continue
                    raise Unavailable(
                        f"the {model} worker running this request stopped responding "
                        "(killed or crashed)"
                    ) from None
                except _Dropped:
                    raise Unavailable(self._no_taker_message(model, queue_ttl)) from None
                except _Expired:
                    self._discard(job)
                    raise Timeout(
                        f"no answer from a {model} worker within {time.monotonic() - started:.0f} s"
                    ) from None
                if payload.get("ok"):
                    return payload
                if payload.get("error") == "unknown_image" and not resent:
                    # Redis lost the image (restart, eviction, TTL): send the bytes and retry once.
                    self._forget_image(sha)
                    self._store_image(image, force=True)
                    resent = True
                    continue
                raise error_from_reply(payload)

    def _wait(self, job: Job, model: str, deadline: float) -> dict[str, Any]:
        polls = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired
            block = max(1, min(self.poll_seconds, math.ceil(remaining)))
            result = job.latest_result(timeout=block)
            if result is not None:
                return self._outcome(result)
            polls += 1
            status, worker = self.redis.hmget(job.key, "status", "worker_name")
            if status is None:
                result = job.latest_result()  # finished between the two reads?
                if result is not None:
                    return self._outcome(result)
                raise _Dropped  # its rq ttl expired before any worker took it
            status = status.decode()
            if status == JobStatus.QUEUED and polls == 1 and not self._has_live_worker(model):
                self._discard(job)
                raise _Dropped
            alive = worker is not None and is_alive(self.redis, self.keys, worker.decode())
            if status == JobStatus.STARTED and not alive:
                self._discard(job)
                raise _WorkerLost

    def _outcome(self, result: Result) -> dict[str, Any]:
        if result.type == Result.Type.SUCCESSFUL:
            payload = result.return_value
            if not isinstance(payload, dict):
                raise WorkerReplyError(f"malformed reply from the worker: {payload!r:.200}")
            return payload
        if result.type == Result.Type.STOPPED:
            raise Unavailable("the job was stopped on its worker")
        lines = [line for line in (result.exc_string or "").strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else result.type.name.lower()
        raise TapmaskError(f"the worker could not run the job: {reason}")

    def _discard(self, job: Job) -> None:
        with suppress(redis.RedisError):
            self.redis.delete(job.key)  # a worker that pops it later skips it

    def _has_live_worker(self, model: str) -> bool:
        return any(model in w.get("models", ()) for w in live_workers(self.redis, self.keys))

    def _no_taker_message(self, model: str, queue_ttl: int) -> str:
        try:
            alive = self._has_live_worker(model)
        except redis.RedisError:
            alive = False
        if not alive:
            return f"no live worker serves model {model!r}; start one with `tapmask worker`"
        return f"every {model} worker stayed busy for {queue_ttl} s; the request was dropped"
