"""``tapmask worker``: a GPU (or CPU) worker of the shared Redis/rq pool.

A worker loads its models once through ``Engine.load`` and then never forks (``TapmaskWorker``
is an rq ``SimpleWorker``: a forked child cannot use the parent's CUDA context, and forking
would also throw away the Engine's warm caches). It listens to every model's ``interactive``
queue before any ``batch`` queue, so clicks overtake queued prefetches, and it plugs a
``RedisEmbeddingStore`` into its Engine so a follow-up click that lands on another worker
decodes against the shared embedding instead of re-encoding. Only the functions of
``backends.redis.jobs`` ever run here.

A heartbeat thread keeps the worker's presence record (``backends.redis.presence``) and rq's own
worker record fresh; dispatchers use the presence key to notice a worker killed mid-job within
seconds. SIGTERM (or Ctrl+C) is a warm shutdown: the current job finishes, then the worker
deregisters and exits; a second signal is a cold shutdown. Lost Redis connections are retried
(a Redis restart is survived).

Extra models (tests, benchmarks, in-house models) come from ``--plugin MODULE`` (or
``TAPMASK_PLUGINS=mod1,mod2``): modules imported before the models are loaded, which call
``backends.models.registry.register(ModelSpec(...))``; jobs can never name a plugin.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.job_lifecycle import format_exc_info
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import register as rq_register

from backends.redis.batching import EncodeBatcher
from backends.redis.jobs import TapmaskJob, WorkerRuntime
from backends.redis.metrics import WorkerMetrics, function_label, outcome_of
from backends.redis.presence import WorkerInfo, remove_presence, write_presence

log = logging.getLogger(__name__)

MiB = 1 << 20
FAILURE_TTL = 24 * 3600  # failed jobs (and their tracebacks) stay at most a day


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
        metrics: WorkerMetrics | None = None,
        batcher: EncodeBatcher | None = None,
        max_job_seconds: int | None = None,
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
        self.metrics = metrics
        self.batcher = batcher
        self.max_job_seconds = max_job_seconds
        if metrics is not None:
            metrics.worker = self
        self.last_beat_ok: float | None = None  # when Redis last accepted our presence record
        self.stopping = False
        self._holding_job = False
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self.info.state == "busy"

    # -- lifecycle -----------------------------------------------------------------------------
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        # rq installs its SIGTERM handler only after bootstrap; take it over before our
        # presence appears, so a drain from then on is always rq's warm shutdown.
        self._install_signal_handlers()
        self.info.state = "idle"
        self._beat()
        self._beat_stop.clear()
        self._beat_thread = threading.Thread(
            target=self._beat_loop, name="tapmask-heartbeat", daemon=True
        )
        self._beat_thread.start()

    def teardown(self) -> None:
        self._stop_beats()  # first: a late beat must not re-register what teardown removes
        try:
            super().teardown()
        finally:
            self.leave()

    def _stop_beats(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
            self._beat_thread = None

    def leave(self) -> None:
        """Stop the heartbeats and delete the presence record (idempotent): dispatchers and
        ``tapmask workers`` stop counting this worker at once."""
        self._stop_beats()
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                remove_presence(pipe, self.runtime.keys, self.name)
                pipe.execute()
        except redis.RedisError:
            pass

    def subscribe(self) -> None:
        """rq's command channel (``rq.command``), listened to by a thread that wakes every
        second. rq's own thread sleeps 60 s in ``get_message`` until the subscription is
        confirmed, and a SIGTERM in that window made the warm shutdown wait for it (redis-py
        joins the thread without a timeout): a worker drained just after it started hung."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=self._pubsub_exception_handler
        )

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
        stats = self.runtime.engine.stats
        encodes, encode_seconds = stats.encodes, stats.encode_seconds
        clock = time.perf_counter()
        reply: Any = None
        performed = False
        try:
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            if self.max_job_seconds:  # our own bound: a drain never waits longer than this
                timeout = min(int(timeout), self.max_job_seconds)
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                if self.batcher is not None:
                    self.batcher.before(job)  # the images waiting behind it, in one pass
                reply = job.perform()  # TapmaskJob.func: only tapmask job functions resolve
            performed = True
            self._job_succeeded(job, reply, started)
        except Exception:
            self._job_failed(job, sys.exc_info(), started)
        finally:
            if self.metrics is not None:
                self.metrics.job_finished(
                    job.origin,
                    _function_of(job),
                    outcome_of(reply) if performed else "failed",
                    time.perf_counter() - clock,
                    _queue_wait(job),
                    stats.encodes - encodes,
                    stats.encode_seconds - encode_seconds,
                )

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
                write_presence(pipe, keys, info, self.presence_ttl)
                # rq's own record, rebuilt in full so a restarted Redis lists this worker again
                pipe.hset(self.key, mapping=self.serialize())
                pipe.hset(self.key, "state", self.get_state())
                pipe.hset(self.key, "last_heartbeat", utcformat(self.last_heartbeat))
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.expire(self.executions_key, self.worker_ttl + 60)
                rq_register(self, pipe)
                pipe.execute()
            self.last_beat_ok = info.heartbeat
        except redis.RedisError as exc:
            log.debug("heartbeat failed: %s", exc)


def _function_of(job: Job) -> str:
    try:
        return function_label(job.func_name)
    except Exception:  # an undecodable payload (it failed as such): still counted
        return "other"


def _queue_wait(job: Job) -> float | None:
    """Seconds from enqueue (front end's clock) to start (ours), when rq recorded both."""
    if job.enqueued_at is None or job.started_at is None:
        return None
    return (job.started_at - job.enqueued_at).total_seconds()
