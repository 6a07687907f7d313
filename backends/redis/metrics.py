"""Prometheus metrics of a ``tapmask worker`` (``--metrics-port``): what it ran, how long clicks
waited and took, its caches, its device memory, and the pool as ``tapmask workers`` sees it.

Names are stable (the Grafana dashboard and the alert rules in ``deploy/monitoring/`` use them,
and a test scrapes a real worker for every name they use). They share the ``tapmask_`` prefix and
the ``tapmask_cache_*`` names with the Label Studio backend's ``/metrics``.

Per worker (this process):

* ``tapmask_worker_jobs_total{model,queue,function,outcome}``: jobs finished. ``queue`` is the
  queue kind (``interactive`` / ``batch``); ``outcome`` is ``ok``, ``client_error`` (an error
  reply with a 4xx status: a bad image or prompt), ``error`` (an error reply with a 5xx status:
  the model failed, the job timed out) or ``failed`` (no reply at all: a job that is not a tapmask
  job, a crash outside the job function). ``tapmask workers`` counts every reply as a job and every
  error reply as an error: its JOBS column is the sum without ``failed``, ERR the sum of
  ``client_error`` and ``error``.
* ``tapmask_worker_job_seconds{model,queue,function}``: run time of a job (histogram).
* ``tapmask_worker_queue_wait_seconds{model,queue}``: enqueue to start (rq's ``enqueued_at`` to
  ``started_at``; the clocks of the front end and the worker). A click that waits longer than
  ``TAPMASK_QUEUE_TTL`` is dropped unstarted and never observed here.
* ``tapmask_worker_encode_seconds{model}``: image encodes run by this worker's jobs (histogram).
* ``tapmask_worker_busy``, ``tapmask_worker_heartbeat_age_seconds`` (since the last presence
  write Redis accepted), ``tapmask_worker_redis_up``,
  ``tapmask_worker_info{worker,hostname,device,models,queues}`` (always 1).
* ``tapmask_engine_*_total``: the Engine's counters (encodes, decodes and their seconds, state
  and shared-embedding hits); ``tapmask_cache_{hits,misses,evictions}_total{cache}``,
  ``tapmask_cache_{bytes,entries,limit_bytes}{cache}``: its in-process caches.
* ``tapmask_worker_device_memory_bytes{device,kind}``: CUDA memory (``allocated``, ``reserved``,
  ``peak_allocated``), only in a worker whose models already use CUDA: the metrics never import
  torch, and a torch-free worker exports the family without samples.

The pool (read from Redis at each scrape, the same reads as ``tapmask workers``; every worker
exports the same values, so aggregate them with ``max``):

* ``tapmask_pool_workers{model,queue}``: live workers listening on that queue;
* ``tapmask_queue_waiting_jobs{model,queue}``: jobs waiting in it (the rq list KEDA counts).
"""

from __future__ import annotations

import logging
import math
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from backends.engine import Engine
from backends.redis.presence import known_models, live_workers, queue_depths
from backends.redis.protocol import JOB_NAMES, QUEUE_KINDS, Keys

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "client_error", "error", "failed")
#: What each queue kind mostly carries (the series created at start-up).
TYPICAL_FUNCTION = {"interactive": "segment_job", "batch": "prefetch_job"}
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: 4 and 5 s bracket the default click TTL (5 s); batch jobs may wait up to an hour.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 10, 30, 60, 300, 3600)
ENCODE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def outcome_of(reply: Any) -> str:
    """``ok`` / ``client_error`` / ``error`` for a job function's reply (see the module doc)."""
    if isinstance(reply, dict) and reply.get("ok") is True:
        return "ok"
    status = reply.get("status") if isinstance(reply, dict) else None
    if isinstance(status, int) and 400 <= status < 500:
        return "client_error"
    return "error"


def function_label(func_name: str | None) -> str:
    """The short name of a tapmask job function, ``other`` for anything else (bounded labels)."""
    if func_name in JOB_NAMES:
        return str(func_name).rsplit(".", 1)[-1]
    return "other"


class WorkerView(Protocol):
    """What the metrics read from a running worker (``TapmaskWorker`` provides it)."""

    name: str
    busy: bool
    last_beat_ok: float | None


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    hostname: str
    device: str | None
    models: tuple[str, ...]
    queue_kinds: tuple[str, ...]


class _StateCollector(Collector):
    """Gauges and counters read at scrape time: worker state, Engine counters, caches, CUDA
    memory, and the pool as Redis holds it."""

    def __init__(
        self,
        identity: WorkerIdentity,
        engine: Engine,
        view: Callable[[], WorkerView | None],
        keys: Keys,
        pool: redis.Redis | None,
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.view = view
        self.keys = keys
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        yield from self._worker()
        yield from self._engine()
        yield from self._caches()
        yield _device_memory()
        yield from self._pool()

    def _worker(self) -> Iterator[Metric]:
        ident = self.identity
        info = GaugeMetricFamily(
            "tapmask_worker_info",
            "this worker (always 1): its name, host, device, models and queue kinds",
            labels=["worker", "hostname", "device", "models", "queues"],
        )
        info.add_metric(
            [
                ident.name,
                ident.hostname,
                ident.device or "",
                ",".join(ident.models),
                ",".join(ident.queue_kinds),
            ],
            1,
        )
        yield info
        worker = self.view()
        busy = GaugeMetricFamily("tapmask_worker_busy", "1 while a job runs, else 0")
        busy.add_metric([], 1 if worker is not None and worker.busy else 0)
        yield busy
        age = GaugeMetricFamily(
            "tapmask_worker_heartbeat_age_seconds",
            "seconds since Redis last accepted this worker's presence record (dispatchers "
            "count it dead after 5 heartbeats)",
        )
        last = worker.last_beat_ok if worker is not None else None
        age.add_metric([], time.time() - last if last else math.inf)
        yield age

    def _engine(self) -> Iterator[Metric]:
        stats = self.engine.stats
        counters = (
            ("tapmask_engine_encodes", "image encodes", stats.encodes),
            ("tapmask_engine_encode_seconds", "seconds spent encoding", stats.encode_seconds),
            ("tapmask_engine_decodes", "mask decodes", stats.decodes),
            ("tapmask_engine_decode_seconds", "seconds spent decoding", stats.decode_seconds),
            ("tapmask_engine_state_hits", "interaction states found cached", stats.state_hits),
            (
                "tapmask_engine_shared_embedding_hits",
                "embeddings taken from the shared Redis tier instead of encoding",
                stats.shared_hits,
            ),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family

    def _caches(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("tapmask_cache_hits", "cache hits", labels=["cache"])
        misses = CounterMetricFamily("tapmask_cache_misses", "cache misses", labels=["cache"])
        evictions = CounterMetricFamily(
            "tapmask_cache_evictions", "entries evicted to stay within the bound", labels=["cache"]
        )
        size = GaugeMetricFamily("tapmask_cache_bytes", "bytes held", labels=["cache"])
        entries = GaugeMetricFamily("tapmask_cache_entries", "entries held", labels=["cache"])
        limit = GaugeMetricFamily("tapmask_cache_limit_bytes", "the bound", labels=["cache"])
        engine = self.engine
        for cache in (engine.images, engine.embeddings, engine.states):
            stats = cache.stats
            hits.add_metric([cache.name], stats.hits)
            misses.add_metric([cache.name], stats.misses)
            evictions.add_metric([cache.name], stats.evictions)
            size.add_metric([cache.name], stats.bytes)
            entries.add_metric([cache.name], stats.entries)
            limit.add_metric([cache.name], cache.max_bytes)
        yield from (hits, misses, evictions, size, entries, limit)

    def _pool(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "tapmask_worker_redis_up", "1 when this scrape could read the pool from Redis"
        )
        workers = GaugeMetricFamily(
            "tapmask_pool_workers",
            "live workers (fresh presence records) listening on a model's queue; the same "
            "value from every worker: aggregate with max",
            labels=["model", "queue"],
        )
        waiting = GaugeMetricFamily(
            "tapmask_queue_waiting_jobs",
            "jobs waiting in a model's queue (the rq list KEDA counts; running jobs are not "
            "in it); the same value from every worker: aggregate with max",
            labels=["model", "queue"],
        )
        try:
            pool = pool_snapshot(self.pool, self.keys) if self.pool is not None else None
        except redis.RedisError as exc:
            log.debug("metrics: cannot read the pool: %s", exc)
            pool = None
        up.add_metric([], 0 if pool is None else 1)
        for (model, kind), (count, depth) in sorted((pool or {}).items()):
            workers.add_metric([model, kind], count)
            waiting.add_metric([model, kind], depth)
        yield from (up, workers, waiting)


def pool_snapshot(connection: redis.Redis, keys: Keys) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(model, queue kind): (live workers listening, waiting jobs)}`` for every model a live
    worker serves or rq knows a queue of (what ``tapmask workers`` lists)."""
    alive = live_workers(connection, keys)
    models = known_models(connection, keys, alive)
    depths = queue_depths(connection, keys, models)
    listening: dict[tuple[str, str], int] = {}
    for record in alive:
        for queue in record.get("queues", []):
            parsed = keys.parse_queue(str(queue))
            if parsed is not None:
                listening[parsed] = listening.get(parsed, 0) + 1
    return {
        (model, kind): (listening.get((model, kind), 0), depths[model][kind])
        for model in models
        for kind in QUEUE_KINDS
    }


def _device_memory() -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "tapmask_worker_device_memory_bytes",
        "CUDA memory of this process (torch's caching allocator): allocated, reserved, "
        "peak_allocated; no samples without CUDA",
        labels=["device", "kind"],
    )
    torch = sys.modules.get("torch")  # never imported here: a torch-free worker stays so
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is None or not cuda.is_initialized():
            return family
        for index in range(cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], cuda.memory_allocated(index))
            family.add_metric([device, "reserved"], cuda.memory_reserved(index))
            family.add_metric([device, "peak_allocated"], cuda.max_memory_allocated(index))
    except Exception as exc:  # a metrics scrape never takes a worker down
        log.debug("metrics: no CUDA memory: %s", exc)
    return family


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
        pass


class WorkerMetrics:
    """The registry of one worker process, fed by the worker after each job, read by Prometheus
    through ``serve``."""

    def __init__(
        self,
        identity: WorkerIdentity,
        engine: Engine,
        keys: Keys,
        *,
        pool: redis.Redis | None = None,
    ) -> None:
        #: The running worker whose state the scrape reads (``TapmaskWorker`` sets itself).
        self.worker: WorkerView | None = None
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "tapmask_worker_jobs",
            "jobs finished, by model, queue kind, job function and outcome",
            ["model", "queue", "function", "outcome"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "tapmask_worker_job_seconds",
            "run time of a job on this worker",
            ["model", "queue", "function"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "tapmask_worker_queue_wait_seconds",
            "time a job waited in its queue (enqueued to started)",
            ["model", "queue"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.encode_seconds = Histogram(
            "tapmask_worker_encode_seconds",
            "image encodes run by this worker's jobs",
            ["model"],
            buckets=ENCODE_BUCKETS,
            registry=self.registry,
        )
        for model in identity.models:  # every series exists from the start (rates work at once)
            for kind in identity.queue_kinds:
                self.queue_wait.labels(model, kind)
                for outcome in OUTCOMES:
                    self.jobs.labels(model, kind, TYPICAL_FUNCTION[kind], outcome)
            self.encode_seconds.labels(model)
        self.registry.register(_StateCollector(identity, engine, lambda: self.worker, keys, pool))
        self.keys = keys
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def job_finished(
        self,
        origin: str,
        function: str,
        outcome: str,
        seconds: float,
        waited: float | None,
        encodes: int = 0,
        encode_seconds: float = 0.0,
    ) -> None:
        """Record one job (``origin``: its queue name; ``encodes``: the Engine encodes it ran)."""
        model, kind = self.keys.parse_queue(origin) or ("unknown", "unknown")
        self.jobs.labels(model, kind, function, outcome).inc()
        self.job_seconds.labels(model, kind, function).observe(max(0.0, seconds))
        if waited is not None:
            self.queue_wait.labels(model, kind).observe(max(0.0, waited))
        if encodes > 0:
            each = max(0.0, encode_seconds) / encodes
            for _ in range(encodes):
                self.encode_seconds.labels(model).observe(each)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``GET /metrics`` (Prometheus) and ``GET /healthz`` (200 while the process
        answers; never touches Redis: a liveness probe must not restart workers during a Redis
        outage, which they survive) on a daemon thread; returns the bound port."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            return metrics_app(environ, start_response)

        self._server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tapmask-metrics", daemon=True
        )
        self._thread.start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
