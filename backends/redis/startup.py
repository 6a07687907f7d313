"""Starting a ``tapmask worker``: plugins, models, Redis, metrics, then rq's loop until a stop.

``build_worker`` loads everything once (models before any job, never per request);
``run_worker`` serves until SIGTERM (warm shutdown), ``--burst`` or ``--max-jobs``, and
reconnects when Redis goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from rq.exceptions import StopRequested
from rq.utils import now, utcformat

from backends.engine import Engine
from backends.errors import TapmaskError
from backends.redis import jobs
from backends.redis.batching import EncodeBatcher
from backends.redis.connection import connect
from backends.redis.embeddings import RedisEmbeddingStore
from backends.redis.jobs import WorkerRuntime
from backends.redis.metrics import WorkerIdentity, WorkerMetrics
from backends.redis.protocol import QUEUE_KINDS, Keys, check_model_name
from backends.redis.worker import TapmaskWorker

log = logging.getLogger(__name__)

MiB = 1 << 20


def _exit_now(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _split(values: Sequence[str] | str | None) -> list[str]:
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def load_plugins(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise TapmaskError(f"cannot import plugin {name!r}: {exc}") from exc


def build_worker(args: argparse.Namespace) -> TapmaskWorker:
    """Load plugins and models, connect, and build the worker (does not start it)."""
    models = _split(args.models) or _split(os.environ.get("TAPMASK_WORKER_MODELS"))
    if not models:
        raise TapmaskError("no models: pass --models NAME[,NAME…] (or TAPMASK_WORKER_MODELS)")
    for model in models:
        check_model_name(model)
    kinds = queue_kinds(args.queue_kinds)
    load_plugins(_split(args.plugin) + _split(os.environ.get("TAPMASK_PLUGINS")))
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
    runtime = WorkerRuntime(engine=engine, connection=connection, keys=keys, name=name)
    jobs.install(runtime)
    # Every interactive queue before any batch queue: clicks overtake prefetches.
    queues = [keys.queue(m, kind) for kind in kinds for m in models]
    metrics = None
    if args.metrics_port is not None and args.metrics_port >= 0:
        identity = WorkerIdentity(
            name, socket.gethostname(), args.device, tuple(models), tuple(kinds)
        )
        # Its own client with short timeouts: a scrape must not hang on a stuck Redis.
        pool = connect(args.redis_url, socket_timeout=2.0, retries=0)
        metrics = WorkerMetrics(identity, engine, keys, pool=pool)
    worker = TapmaskWorker(
        queues,
        runtime=runtime,
        models=models,
        device=args.device,
        heartbeat=args.heartbeat,
        metrics=metrics,
        max_job_seconds=args.job_timeout,
        batcher=EncodeBatcher(
            runtime,
            args.encode_batch,
            args.encode_batch_wait_ms / 1000.0,
            clicks=args.encode_batch_clicks,
        ),
        worker_ttl=60,
        default_result_ttl=60,
    )
    return worker


def queue_kinds(values: Sequence[str] | str | None) -> list[str]:
    """The queue kinds a worker listens to, in priority order (interactive first)."""
    kinds = _split(values) or list(QUEUE_KINDS)
    unknown = sorted(set(kinds) - set(QUEUE_KINDS))
    if unknown:
        raise TapmaskError(f"unknown queue kind(s) {unknown}: choose from {list(QUEUE_KINDS)}")
    return [kind for kind in QUEUE_KINDS if kind in kinds]


def run_worker(args: argparse.Namespace) -> int:
    # Loading models can take minutes, before rq installs its own handlers. As a container's
    # PID 1 (Kubernetes runs no init) the process would ignore SIGTERM until then and be
    # killed only at the end of the grace period: exit at once instead (nothing to finish).
    signal.signal(signal.SIGTERM, _exit_now)
    worker = build_worker(args)
    if worker.metrics is not None:
        port = worker.metrics.serve(args.metrics_port, args.metrics_host)
        worker.info.metrics_port = port
        log.warning(
            "worker %s: metrics on http://%s:%d/metrics", worker.name, args.metrics_host, port
        )
    try:
        return _work(worker, args)
    finally:
        if worker.metrics is not None:
            worker.metrics.close()


def _work(worker: TapmaskWorker, args: argparse.Namespace) -> int:
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
        except StopRequested:  # stopped before rq's loop began: no teardown ran
            worker.leave()
        except (redis.RedisError, ValueError) as exc:
            log.warning("worker %s lost Redis (%s); reconnecting", worker.name, exc)
        if worker.stopping or args.burst or args.max_jobs is not None:
            return 0
        time.sleep(1.0)  # Redis went away mid-job or at start-up: wait, then start over
        with contextlib.suppress(redis.RedisError):
            worker.connection.hset(worker.key, "death", utcformat(now()))
