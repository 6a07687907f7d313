"""The Redis/rq transport: ``RedisDispatcher`` (front-end side) and what workers share with it.

A click travels as a small JSON job (rq ``JSONSerializer``; nothing is ever pickled):

* the image bytes go to Redis once, under ``<ns>:img:<sha256>`` with a TTL; a dispatcher that
  stored (or refreshed) an image recently sends only its key, and an ``EXPIRE`` (no bytes) tells
  it whether another process already stored it. A worker that finds the key gone answers
  ``unknown_image`` and the dispatcher resends the bytes once;
* the job goes to the model's ``<ns>:<model>:interactive`` queue (clicks, embedding exports) or
  ``<ns>:<model>:batch`` queue (prefetches); workers listen to every interactive queue before any
  batch queue;
* the worker answers with a JSON payload: ``{"ok": true, "mask": <COCO RLE>, "score", "model"}``
  or ``{"ok": false, "error": <code>, "status": <http status>, "detail"}``, so a worker-side
  ``TapmaskError`` comes back to the caller as the same class with the same status;
* the caller blocks on rq's result stream (``job.latest_result(timeout=…)``) in one-second
  slices, and between slices checks that the job was picked up (an interactive job nobody takes
  within ``queue_ttl`` seconds is dropped by its rq ``ttl``: 503) and that the worker running it
  is still alive (workers keep a presence key with a short TTL; a worker killed mid-job is
  noticed within a few seconds and the job is retried once on another worker, else 503).
  Redis itself unreachable: 503 at once; no answer by the deadline: 504.

Also here: ``RedisEmbeddingStore``, the shared second-tier embedding cache workers plug into
their ``Engine`` (bytes per (model, image), TTL, per-entry cap, total size bounded by an index),
and the key layout both sides agree on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from backends import images, masks
from backends.errors import ModelNotFound, PromptError, TapmaskError, Timeout, Unavailable
from backends.prompts import Prompt, Segmentation

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

#: The only functions a tapmask worker runs (rq JSON jobs name their function by dotted path).
SEGMENT_JOB = "backends.worker.segment_job"
PREFETCH_JOB = "backends.worker.prefetch_job"
EXPORT_JOB = "backends.worker.export_job"
JOB_FUNCTION_NAMES = frozenset({SEGMENT_JOB, PREFETCH_JOB, EXPORT_JOB})

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

DEFAULT_URL = "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------------------------
# Key layout


@dataclass(frozen=True)
class Keys:
    """Every Redis key and rq queue name tapmask uses, under one namespace."""

    namespace: str = "tapmask"

    def interactive(self, model: str) -> str:
        return f"{self.namespace}:{model}:interactive"

    def batch(self, model: str) -> str:
        return f"{self.namespace}:{model}:batch"

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


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ModelNotFound(f"invalid model name {model!r}")
    return model


def check_image_key(key: Any) -> str:
    if not isinstance(key, str) or not _SHA256.match(key):
        raise PromptError(f"invalid image key {key!r}: expected a sha256 hex digest")
    return key


def connect(
    url: str | None = None, *, socket_timeout: float = 10.0, retries: int = 1
) -> redis.Redis:
    """A client that fails fast when Redis is down (one immediate retry: a pooled connection
    that died with a Redis restart reconnects on that retry instead of failing the request)."""
    return redis.Redis.from_url(
        url or os.environ.get("TAPMASK_REDIS_URL") or DEFAULT_URL,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries),
        health_check_interval=30,
    )


@contextmanager
def redis_errors_as_unavailable(what: str = "Redis") -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise Unavailable(f"{what} is unreachable: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Payloads (JSON both ways)


def _error_classes() -> dict[str, type[TapmaskError]]:
    found: dict[str, type[TapmaskError]] = {}
    stack: list[type[TapmaskError]] = [TapmaskError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return found


def error_to_payload(exc: TapmaskError) -> dict[str, Any]:
    return {"ok": False, "error": exc.code, "status": int(exc.status), "detail": str(exc)}


def error_from_payload(payload: dict[str, Any]) -> TapmaskError:
    """The worker's error as the same ``TapmaskError`` class (matched by code), same status."""
    code = str(payload.get("error") or TapmaskError.code)
    detail = str(payload.get("detail") or code)
    cls = _error_classes().get(code)
    exc = cls(detail) if cls is not None else TapmaskError(detail)
    try:
        status = int(payload.get("status", exc.status))
    except (TypeError, ValueError):
        status = exc.status
    if cls is None or status != exc.status:
        exc.status = status
        exc.code = code
    return exc


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


def segmentation_to_payload(result: Segmentation, **meta: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "mask": masks.mask_to_coco_rle(result.mask),
        "score": float(result.score),
        "model": result.model,
        "extra": _jsonable(result.extra),
        **meta,
    }


def segmentation_from_payload(payload: dict[str, Any]) -> Segmentation:
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
        raise TapmaskError(f"malformed reply from the worker: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Live workers


def live_workers(connection: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Presence records of the workers whose heartbeat key has not expired (stale names pruned)."""
    names = sorted(
        n.decode() if isinstance(n, bytes) else n for n in connection.smembers(keys.workers)
    )
    if not names:
        return []
    values = connection.mget([keys.presence(n) for n in names])
    alive, dead = [], []
    for name, raw in zip(names, values, strict=True):
        if raw is None:
            dead.append(name)
            continue
        try:
            alive.append(json.loads(raw))
        except ValueError:
            dead.append(name)
    if dead:
        connection.srem(keys.workers, *dead)
    return alive


# --------------------------------------------------------------------------------------------
# Dispatcher


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
        self.url = url or os.environ.get("TAPMASK_REDIS_URL") or DEFAULT_URL
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
        if export_dtype not in ("float16", "float32"):
            raise ValueError("export_dtype must be float16 or float32")
        self.export_dtype = export_dtype
        self.poll_seconds = max(1, int(poll_seconds))
        self._queues: dict[str, Queue] = {}
        self._stored: OrderedDict[str, float] = OrderedDict()  # image sha -> when stored/refreshed
        self._prefetched: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, models: list[str] | None = None) -> RedisDispatcher:
        env = os.environ
        return cls(
            env.get("TAPMASK_REDIS_URL") or DEFAULT_URL,
            models,
            namespace=env.get("TAPMASK_REDIS_NAMESPACE", "tapmask"),
            queue_ttl=float(env.get("TAPMASK_QUEUE_TTL", 5)),
            job_timeout=float(env.get("TAPMASK_JOB_TIMEOUT", 60)),
            image_ttl=int(env.get("TAPMASK_IMAGE_TTL", 3600)),
        )

    # -- Dispatcher API ----------------------------------------------------------------------
    def segment(
        self, model: str, image: bytes, prompt: Prompt, *, timeout: float | None = None
    ) -> Segmentation:
        self._check_model(model)
        request: dict[str, Any] = {"model": model, "prompt": prompt.to_dict()}
        if prompt.previous_mask is not None:
            request["previous_mask"] = masks.mask_to_coco_rle(prompt.previous_mask)
        payload = self._call(SEGMENT_JOB, model, image, request, timeout)
        return segmentation_from_payload(payload)

    def prefetch(self, model: str, image: bytes) -> None:
        self._check_model(model)
        with redis_errors_as_unavailable(self._where):
            sha = self._store_image(image)
            key = (model, sha)
            now = time.monotonic()
            with self._lock:
                seen = self._prefetched.get(key)
            if seen is not None and now - seen < 60.0:
                return  # asked for within the last minute
            request = {"v": PROTOCOL_VERSION, "model": model, "image": sha}
            self._enqueue(
                self.keys.batch(model), PREFETCH_JOB, request, ttl=self.batch_ttl, result_ttl=0
            )
            with self._lock:
                self._remember(self._prefetched, key, now)

    def export_embedding(
        self, model: str, image: bytes, *, timeout: float | None = None
    ) -> np.ndarray:
        self._check_model(model)
        request = {"model": model, "dtype": self.export_dtype}
        payload = self._call(EXPORT_JOB, model, image, request, timeout)
        try:
            spec = payload["array"]
            dtype, shape, key = np.dtype(spec["dtype"]), tuple(spec["shape"]), spec["key"]
        except (KeyError, TypeError) as exc:
            raise TapmaskError(f"malformed embedding reply from the worker: {exc}") from exc
        with redis_errors_as_unavailable(self._where):
            data = self.redis.getdel(key)
        if data is None:
            raise Unavailable("the exported embedding expired before it was read")
        array = np.frombuffer(data, dtype=dtype)
        if array.size != math.prod(shape):
            raise TapmaskError(f"exported embedding has {array.size} values, expected {shape}")
        return array.reshape(shape).astype(np.float32)

    def models(self) -> list[str]:
        if self._models is not None:
            return sorted(self._models)
        with redis_errors_as_unavailable(self._where):
            workers = live_workers(self.redis, self.keys)
        return sorted({m for w in workers for m in w.get("models", [])})

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
        request: dict[str, Any],
        timeout: float | None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        job_timeout = self.job_timeout
        queue_ttl = self.queue_ttl
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
                    self.keys.interactive(model),
                    func,
                    {"v": PROTOCOL_VERSION, **request, "image": sha},
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
                raise error_from_payload(payload)

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
            alive = worker is not None and self.redis.exists(self.keys.presence(worker.decode()))
            if status == JobStatus.STARTED and not alive:
                self._discard(job)
                raise _WorkerLost

    def _outcome(self, result: Result) -> dict[str, Any]:
        if result.type == Result.Type.SUCCESSFUL:
            payload = result.return_value
            if not isinstance(payload, dict):
                raise TapmaskError(f"malformed reply from the worker: {payload!r:.200}")
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


def redis_location(connection: redis.Redis) -> str:
    kwargs = connection.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


# --------------------------------------------------------------------------------------------
# Shared embedding cache


_PUT_SCRIPT = """
-- KEYS: entry, index (zset key -> last use), sizes (hash key -> bytes), total (counter)
-- ARGV: data, ttl seconds, now (seconds), max total bytes
local function evict(key)
  local size = redis.call('HGET', KEYS[3], key)
  if size then redis.call('DECRBY', KEYS[4], size) end
  redis.call('HDEL', KEYS[3], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('DEL', key)
end
local now, ttl, limit = tonumber(ARGV[3]), tonumber(ARGV[2]), tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, 256)
for _, key in ipairs(expired) do evict(key) end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 1 then evict(KEYS[1]) end
local size = string.len(ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size)
local guard = 0
while total > limit and guard < 1024 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  evict(oldest[1])
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
  guard = guard + 1
end
return total
"""


class RedisEmbeddingStore:
    """Second-tier embedding cache shared by all workers (``Engine(shared_embeddings=…)``).

    One key per (model, image sha256) holding the model's own serialisation (SAM: fp16 features
    + sizes), with a TTL refreshed on use. Bounded without relying on Redis ``maxmemory``:
    entries over ``max_entry_bytes`` are not shared, and an index (sorted set by last use + a
    size hash + a byte counter) is trimmed, oldest first, to ``max_bytes`` on every put (atomic
    Lua script). Redis errors never fail a click: the store just misses.
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys | None = None,
        *,
        ttl: int = 3600,
        max_bytes: int = 4 << 30,
        max_entry_bytes: int = 64 << 20,
    ) -> None:
        self.redis = connection
        self.keys = keys or Keys()
        self.ttl = int(ttl)
        self.max_bytes = int(max_bytes)
        self.max_entry_bytes = int(max_entry_bytes)
        self._put = connection.register_script(_PUT_SCRIPT)
        self.hits = self.misses = self.puts = self.errors = 0

    def get(self, model: str, image_key: str) -> bytes | None:
        key = self.keys.embedding(model, image_key)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.getex(key, ex=self.ttl)
                pipe.zadd(self.keys.embedding_index, {key: time.time()}, xx=True)
                data, _ = pipe.execute()
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("shared embedding cache unavailable: %s", exc)
            return None
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, model: str, image_key: str, data: bytes) -> None:
        if len(data) > self.max_entry_bytes or len(data) > self.max_bytes:
            return
        keys = self.keys
        try:
            self._put(
                keys=[
                    keys.embedding(model, image_key),
                    keys.embedding_index,
                    keys.embedding_sizes,
                    keys.embedding_bytes,
                ],
                args=[data, self.ttl, f"{time.time():.6f}", self.max_bytes],
            )
            self.puts += 1
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("could not share an embedding: %s", exc)

    def total_bytes(self) -> int:
        return int(self.redis.get(self.keys.embedding_bytes) or 0)
