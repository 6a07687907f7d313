"""``tapmask worker``: a GPU (or CPU) worker of the shared Redis/rq pool; ``tapmask workers``.

A worker loads its models once through ``Engine.load`` and then never forks (``TapmaskWorker``
is an rq ``SimpleWorker``: a forked child cannot use the parent's CUDA context, and forking
would also throw away the Engine's warm caches). It listens to every model's ``interactive``
queue before any ``batch`` queue, so clicks overtake queued prefetches, and it plugs a
``RedisEmbeddingStore`` into its Engine so a follow-up click that lands on another worker
decodes against the shared embedding instead of re-encoding.

Only three functions ever run here: ``segment_job``, ``prefetch_job`` and ``export_job``.
Jobs are JSON (rq ``JSONSerializer``): a pickled payload cannot even be decoded, and
``TapmaskJob`` refuses any function name outside that list, any bound instance, and any
callback, before anything is imported. Each job function turns every failure into a JSON error
payload (``TapmaskError`` code + HTTP status), so one poisoned request fails alone and the
worker keeps serving.

A heartbeat thread keeps a short-TTL presence key (``<ns>:worker:<name>``: models, queues,
state, current job, Engine stats) and rq's own worker record fresh; dispatchers use the
presence key to notice a worker killed mid-job within seconds. SIGTERM (or Ctrl+C) is a warm
shutdown: the current job finishes, then the worker deregisters and exits; a second signal is a
cold shutdown. Lost Redis connections are retried (a Redis restart is survived).

Extra models (tests, benchmarks, in-house models) come from ``--plugin MODULE`` (or
``TAPMASK_PLUGINS=mod1,mod2``): modules imported before the models are loaded, which call
``backends.models.registry.register(ModelSpec(...))``; jobs can never name a plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis
from rq.exceptions import DeserializationError, StopRequested
from rq.job import Job, JobStatus
from rq.job_lifecycle import format_exc_info
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import register as rq_register

from backends import masks
from backends.engine import Engine
from backends.errors import (
    ImageError,
    PromptError,
    TapmaskError,
    Timeout,
    Unavailable,
    UnknownImage,
)
from backends.images import sha256
from backends.prompts import Prompt
from backends.redis_queue import (
    EXPORT_JOB,
    JOB_FUNCTION_NAMES,
    PREFETCH_JOB,
    PROTOCOL_VERSION,
    SEGMENT_JOB,
    Keys,
    RedisEmbeddingStore,
    check_image_key,
    check_model_name,
    connect,
    error_to_payload,
    live_workers,
    redis_errors_as_unavailable,
    segmentation_to_payload,
)
from backends.worker_args import add_worker_arguments, add_workers_arguments

log = logging.getLogger(__name__)

MiB = 1 << 20
FAILURE_TTL = 24 * 3600  # failed jobs (and their tracebacks) stay at most a day


# --------------------------------------------------------------------------------------------
# Job functions (the only code a job can run)


@dataclass
class WorkerRuntime:
    engine: Engine
    connection: redis.Redis
    keys: Keys
    name: str
    output_ttl: int = 120
    jobs: int = 0
    errors: int = 0


_runtime: WorkerRuntime | None = None


def _image_ref(rt: WorkerRuntime, key: Any) -> bytes | str:
    """The Engine's cached image by key, else the bytes from Redis (checked against the key)."""
    key = check_image_key(key)
    if key in rt.engine.images:
        return key
    data = rt.connection.get(rt.keys.image(key))
    if data is None:
        raise UnknownImage(f"image {key[:12]}… is not in Redis (expired or evicted); resend it")
    if sha256(data) != key:
        raise ImageError(f"the bytes stored under image {key[:12]}… do not match their hash")
    return data


def _model(request: dict[str, Any]) -> str:
    return check_model_name(request.get("model"))


def _segment(rt: WorkerRuntime, request: dict[str, Any]) -> dict[str, Any]:
    model = _model(request)
    prompt = request.get("prompt")
    if not isinstance(prompt, dict):
        raise PromptError("the job has no prompt")
    parsed = Prompt.from_dict(prompt)
    if request.get("previous_mask") is not None:
        try:
            previous = masks.coco_rle_to_mask(request["previous_mask"])
        except (ValueError, TypeError) as exc:
            raise PromptError(f"previous_mask: {exc}") from exc
        parsed = Prompt(parsed.clicks, parsed.box, previous)
    result = rt.engine.segment(model, _image_ref(rt, request.get("image")), parsed)
    return segmentation_to_payload(result, worker=rt.name)


def _prefetch(rt: WorkerRuntime, request: dict[str, Any]) -> dict[str, Any]:
    rt.engine.prefetch(_model(request), _image_ref(rt, request.get("image")))
    return {"ok": True, "worker": rt.name}


def _export(rt: WorkerRuntime, request: dict[str, Any]) -> dict[str, Any]:
    dtype = request.get("dtype", "float32")
    if dtype not in ("float16", "float32"):
        raise PromptError(f"unsupported export dtype {dtype!r}")
    array = rt.engine.export_embedding(_model(request), _image_ref(rt, request.get("image")))
    array = np.ascontiguousarray(array, dtype=dtype)
    from rq import get_current_job

    job = get_current_job()
    key = rt.keys.output(job.id if job is not None else uuid.uuid4().hex)
    rt.connection.set(key, array.tobytes(), ex=rt.output_ttl)
    return {
        "ok": True,
        "worker": rt.name,
        "array": {"key": key, "dtype": dtype, "shape": list(array.shape)},
    }


def _run(handler: Callable[[WorkerRuntime, dict[str, Any]], dict[str, Any]], request: Any):
    rt = _runtime
    if rt is None:
        return error_to_payload(Unavailable("this process is not a running tapmask worker"))
    rt.jobs += 1
    try:
        if not isinstance(request, dict) or request.get("v") != PROTOCOL_VERSION:
            raise TapmaskError(
                f"unsupported job payload (this worker speaks protocol v{PROTOCOL_VERSION})"
            )
        return handler(rt, request)
    except TapmaskError as exc:
        rt.errors += 1
        log.info("job failed: %s (%s)", exc, exc.code)
        return error_to_payload(exc)
    except JobTimeoutException as exc:
        rt.errors += 1
        return error_to_payload(Timeout(f"the worker ran past the job timeout: {exc}"))
    except redis.RedisError as exc:
        rt.errors += 1
        return error_to_payload(Unavailable(f"the worker lost Redis: {exc}"))
    except Exception as exc:  # a bug or a model failure: this request fails, the worker goes on
        rt.errors += 1
        log.exception("job failed unexpectedly")
        return error_to_payload(TapmaskError(f"{type(exc).__name__}: {exc}"))


def segment_job(request: dict[str, Any]) -> dict[str, Any]:
    """Interactive: the mask for a prompt, as COCO RLE + score + model."""
    return _run(_segment, request)


def prefetch_job(request: dict[str, Any]) -> dict[str, Any]:
    """Batch: compute and cache (locally and in the shared tier) an image's embedding."""
    return _run(_prefetch, request)


def export_job(request: dict[str, Any]) -> dict[str, Any]:
    """Interactive: the raw embedding, written to a short-lived key as raw bytes."""
    return _run(_export, request)


JOB_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    SEGMENT_JOB: segment_job,
    PREFETCH_JOB: prefetch_job,
    EXPORT_JOB: export_job,
}
assert set(JOB_FUNCTIONS) == JOB_FUNCTION_NAMES


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


# --------------------------------------------------------------------------------------------
# The worker


@dataclass
class WorkerInfo:
    name: str
    hostname: str
    pid: int
    models: list[str]
    queues: list[str]
    device: str | None
    started: float
    state: str = "starting"
    job: str | None = None
    jobs: int = 0
    errors: int = 0
    heartbeat: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


class TapmaskWorker(SimpleWorker):
    """rq ``SimpleWorker`` (no fork) with tapmask's job class, presence heartbeats, a warm
    shutdown that also covers a job just dequeued, and quick reconnects to Redis."""

    job_class = TapmaskJob
    max_connection_wait_time = 2.0

    def __init__(
        self,
        queues: Sequence[str],
        *,
        runtime: WorkerRuntime,
        models: Sequence[str],
        device: str | None = None,
        heartbeat: float = 1.0,
        presence_ttl: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_class", TapmaskJob)
        super().__init__(list(queues), name=runtime.name, connection=runtime.connection, **kwargs)
        self.runtime = runtime
        self.heartbeat_interval = float(heartbeat)
        self.presence_ttl = float(presence_ttl or max(1.0, 5 * self.heartbeat_interval))
        self.info = WorkerInfo(
            name=self.name,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            models=list(models),
            queues=list(queues),
            device=device,
            started=time.time(),
        )
        self.stopping = False
        self._holding_job = False
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self.info.state = "idle"
        self._beat()
        self._beat_stop.clear()
        self._beat_thread = threading.Thread(
            target=self._beat_loop, name="tapmask-heartbeat", daemon=True
        )
        self._beat_thread.start()

    def teardown(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
            self._beat_thread = None
        try:
            super().teardown()
        finally:
            try:
                with self.connection.pipeline(transaction=False) as pipe:
                    pipe.delete(self.runtime.keys.presence(self.name))
                    pipe.srem(self.runtime.keys.workers, self.name)
                    pipe.execute()
            except redis.RedisError:
                pass

    def request_stop(self, signum, frame):
        self.stopping = True
        self.info.state = "stopping"
        super().request_stop(signum, frame)

    def _shutdown(self) -> None:
        if self._holding_job:  # dequeued, maybe not BUSY yet: finish it first (warm shutdown)
            self._stop_requested = True
            return
        super()._shutdown()

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if result is not None:
            self._holding_job = True
        return result

    def execute_job(self, job: Job, queue) -> None:
        """Run one job in this process, in two Redis round trips (start, finish).

        rq's own ``SimpleWorker.execute_job`` spends about a dozen round trips per job on
        features tapmask jobs never use (dependents, callbacks, retries, repeats, per-execution
        records). This keeps rq's data model where it matters: the job hash (status,
        ``worker_name``, timestamps, TTLs), the result stream read by ``latest_result``, the
        failed-job registry, the worker's counters and state.
        """
        job.webhooks = []  # a crafted job hash must not make the worker call out
        self.info.state, self.info.job = "busy", job.id
        try:
            self._run_job(job)
        finally:
            self._holding_job = False
            self.info.state = "stopping" if self.stopping else "idle"
            self.info.job = None

    def _run_job(self, job: Job) -> None:
        started = now()
        with self.connection.pipeline() as pipe:
            job.prepare_for_execution(self.name, pipeline=pipe)  # started, worker_name, times
            pipe.persist(job.key)  # its queue ttl no longer applies
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        self.procline(f"{job.id} from {job.origin}")
        try:
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                value = job.perform()  # TapmaskJob.func: only tapmask job functions resolve
            self._job_succeeded(job, value, started)
        except Exception:
            self._job_failed(job, sys.exc_info(), started)

    def _job_succeeded(self, job: Job, value: Any, started) -> None:
        job.ended_at = now()
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
            if result_ttl != 0:
                Result.create(
                    job,
                    Result.Type.SUCCESSFUL,
                    result_ttl,
                    return_value=value,
                    worker_name=self.name,
                    pipeline=pipe,
                )
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - started, pipe)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            pipe.execute()

    def _job_failed(self, job: Job, exc_info, started) -> None:
        job.ended_at = now()
        self.handle_exception(job, *exc_info)  # logs; safe for undecodable payloads
        exc_string = format_exc_info(exc_info)
        ttl = min(job.failure_ttl or FAILURE_TTL, FAILURE_TTL)
        try:
            with self.connection.pipeline() as pipe:
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
                job.failed_job_registry.add(job, ttl=ttl, exc_string=exc_string, pipeline=pipe)
                Result.create_failure(
                    job, ttl, exc_string=exc_string, worker_name=self.name, pipeline=pipe
                )
                self.increment_failed_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - started, pipe)
                self.set_state(WorkerStatus.IDLE, pipeline=pipe)
                pipe.execute()
        except redis.RedisError:
            raise
        except Exception:  # e.g. a payload that cannot even be re-saved: never kill the worker
            log.exception("could not record the failure of job %s", job.id)
            self.connection.hset(job.key, "status", JobStatus.FAILED)

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is None and state == self.get_state():
            return  # already recorded (the heartbeat rewrites it anyway): save a round trip
        super().set_state(state, pipeline)

    # -- heartbeats ----------------------------------------------------------------------------
    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """rq's heartbeat runs around every job (three round trips). While our heartbeat thread
        refreshes the same record, skip it; otherwise send it as one pipeline."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        if timeout is None and self._beat_thread is not None and self._beat_thread.is_alive():
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.heartbeat_interval):
            self._beat()

    def _beat(self) -> None:
        info = self.info
        info.heartbeat = time.time()
        info.jobs, info.errors = self.runtime.jobs, self.runtime.errors
        info.stats = asdict(self.runtime.engine.stats)
        keys = self.runtime.keys
        try:
            self.last_heartbeat = now()
            if self.birth_date is None:
                self.birth_date = self.last_heartbeat
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.set(
                    keys.presence(self.name),
                    json.dumps(asdict(info)),
                    px=int(self.presence_ttl * 1000),
                )
                pipe.sadd(keys.workers, self.name)
                # rq's own record, rebuilt in full so a restarted Redis lists this worker again
                pipe.hset(self.key, mapping=self.serialize())
                pipe.hset(self.key, "state", self.get_state())
                pipe.hset(self.key, "last_heartbeat", utcformat(self.last_heartbeat))
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.expire(self.executions_key, self.worker_ttl + 60)
                rq_register(self, pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.debug("heartbeat failed: %s", exc)


# --------------------------------------------------------------------------------------------
# Command line


def _split(values: Sequence[str] | str | None) -> list[str]:
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _load_plugins(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise TapmaskError(f"cannot import plugin {name!r}: {exc}") from exc


def build_worker(args: argparse.Namespace) -> TapmaskWorker:
    """Load plugins and models, connect, and build the worker (does not start it)."""
    global _runtime
    models = _split(args.models) or _split(os.environ.get("TAPMASK_WORKER_MODELS"))
    if not models:
        raise TapmaskError("no models: pass --models NAME[,NAME…] (or TAPMASK_WORKER_MODELS)")
    for model in models:
        check_model_name(model)
    _load_plugins(_split(args.plugin) + _split(os.environ.get("TAPMASK_PLUGINS")))
    options: dict[str, Any] = {}
    if args.device:
        options["device"] = args.device
    if args.checkpoint:
        if len(models) != 1:
            raise TapmaskError("--checkpoint needs exactly one model in --models")
        options["checkpoint"] = args.checkpoint

    keys = Keys(args.namespace)
    connection = connect(args.redis_url, socket_timeout=60.0, retries=3)
    store = None
    if args.shared_embeddings_mb > 0:
        store = RedisEmbeddingStore(
            connection,
            keys,
            ttl=args.shared_embedding_ttl,
            max_bytes=int(args.shared_embeddings_mb * MiB),
            max_entry_bytes=int(args.shared_embedding_max_mb * MiB),
        )
    engine = Engine(shared_embeddings=store)
    engine.load(models, **options)  # once, before any job; never per request

    name = args.name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    _runtime = WorkerRuntime(engine=engine, connection=connection, keys=keys, name=name)
    queues = [keys.interactive(m) for m in models] + [keys.batch(m) for m in models]
    return TapmaskWorker(
        queues,
        runtime=_runtime,
        models=models,
        device=args.device,
        heartbeat=args.heartbeat,
        worker_ttl=60,
        default_result_ttl=60,
    )


def run_worker(args: argparse.Namespace) -> int:
    worker = build_worker(args)
    level = "DEBUG" if getattr(args, "verbose", False) else "WARNING"
    log.warning(
        "worker %s serving %s on %s (%s)",
        worker.name,
        ", ".join(worker.info.models),
        args.redis_url,
        ", ".join(worker.info.queues),
    )
    while True:
        try:
            worker.work(
                burst=args.burst,
                max_jobs=args.max_jobs,
                logging_level=level,
                log_format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
        except StopRequested:
            pass
        except (redis.RedisError, ValueError) as exc:
            log.warning("worker %s lost Redis (%s); reconnecting", worker.name, exc)
        if worker.stopping or args.burst or args.max_jobs is not None:
            return 0
        time.sleep(1.0)  # Redis went away mid-job or at start-up: wait, then start over
        with contextlib.suppress(redis.RedisError):
            worker.connection.hset(worker.key, "death", utcformat(now()))


def list_workers(args: argparse.Namespace) -> int:
    keys = Keys(args.namespace)
    connection = connect(args.redis_url, socket_timeout=5.0)
    with redis_errors_as_unavailable(f"Redis at {args.redis_url}"):
        workers = live_workers(connection, keys)
        models = sorted({m for w in workers for m in w.get("models", [])})
        prefix = f"rq:queue:{keys.namespace}:"
        for raw in connection.smembers("rq:queues"):
            name = raw.decode() if isinstance(raw, bytes) else raw
            if name.startswith(prefix) and name.count(":") == 4:
                models.append(name[len(prefix) :].rsplit(":", 1)[0])
        models = sorted(set(models))
        with connection.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.llen(f"rq:queue:{keys.interactive(model)}")
                pipe.llen(f"rq:queue:{keys.batch(model)}")
            depths = pipe.execute()
    queues = {
        model: {"interactive": depths[2 * i], "batch": depths[2 * i + 1]}
        for i, model in enumerate(models)
    }
    if args.json:
        print(json.dumps({"workers": workers, "queues": queues}, indent=2))
        return 0
    print(f"{len(workers)} live worker(s)")
    print(f"{'WORKER':34} {'STATE':9} {'DEVICE':8} {'JOBS':>6} {'ERR':>5} {'BEAT':>6}  MODELS")
    for w in workers:
        beat = f"{time.time() - float(w.get('heartbeat', 0)):.1f}s"
        print(
            f"{w['name'][:34]:34} {w.get('state', '?'):9} {str(w.get('device') or '-')[:8]:8} "
            f"{w.get('jobs', 0):>6} {w.get('errors', 0):>5} {beat:>6}  "
            + ",".join(w.get("models", []))
        )
    print()
    print(f"{'MODEL':24} {'INTERACTIVE':>11} {'BATCH':>7}  WORKERS")
    for model in models:
        serving = sum(model in w.get("models", []) for w in workers)
        q = queues[model]
        print(f"{model[:24]:24} {q['interactive']:>11} {q['batch']:>7}  {serving}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backends.worker [worker options]`` or ``python -m backends.worker list``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = bool(argv) and argv[0] == "list"
    parser = argparse.ArgumentParser(
        prog="python -m backends.worker" + (" list" if listing else ""), description=__doc__
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    (add_workers_arguments if listing else add_worker_arguments)(parser)
    args = parser.parse_args(argv[1:] if listing else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return list_workers(args) if listing else run_worker(args)
    except TapmaskError as exc:
        print(f"tapmask: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run inside the importable module ``backends.worker`` (not ``__main__``), so the job
    # functions rq resolves by dotted name see this process's runtime.
    from backends.worker import main as _main

    sys.exit(_main())
