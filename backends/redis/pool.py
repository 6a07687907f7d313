"""``tapmask worker`` and ``tapmask workers``: their arguments and the pool listing.

Building the ``tapmask`` parser imports only this module's stdlib part: rq, redis and the
Engine load when a command runs.
"""

from __future__ import annotations

import argparse
import os


def _add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TAPMASK_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis to take jobs from (default: $TAPMASK_REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("TAPMASK_REDIS_NAMESPACE", "tapmask"),
        help="key and queue prefix shared with the front ends (default: tapmask)",
    )


def _setting(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    kind: type[int] | type[float],
    default: float,
    help: str,
) -> None:
    """An option whose default comes from an environment variable (containers set those)."""
    parser.add_argument(
        flag,
        type=kind,
        default=kind(os.environ.get(env, default)),
        help=f"{help} (${env}; default {default})",
    )


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``tapmask worker``: which models to serve, where, and the shared-cache bounds."""
    parser.add_argument(
        "--models",
        action="append",
        default=None,
        help="comma-separated model names to load and serve, e.g. sam-vit_h,ritm-h18,grabcut "
        "(default: $TAPMASK_WORKER_MODELS)",
    )
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (passed to every model)")
    parser.add_argument("--checkpoint", help="checkpoint file (only with a single model)")
    _add_redis_arguments(parser)
    parser.add_argument("--name", help="worker name (default: host.pid.random)")
    parser.add_argument(
        "--plugin",
        action="append",
        default=None,
        help="module to import first, to register extra models (also $TAPMASK_PLUGINS)",
    )
    _setting(
        parser,
        "--heartbeat",
        "TAPMASK_WORKER_HEARTBEAT",
        float,
        1.0,
        "seconds between heartbeats; the presence key lives 5 heartbeats",
    )
    _setting(
        parser,
        "--encode-batch",
        "TAPMASK_ENCODE_BATCH",
        int,
        8,
        "most images encoded in one pass: the taken job's and those of jobs already waiting "
        "for the same model (1: no batching)",
    )
    _setting(
        parser,
        "--encode-batch-wait-ms",
        "TAPMASK_ENCODE_BATCH_WAIT_MS",
        float,
        0,
        "prefetches only: how long to wait for more images to batch (a click never waits)",
    )
    parser.add_argument(
        "--encode-batch-clicks",
        action="store_true",
        default=os.environ.get("TAPMASK_ENCODE_BATCH_CLICKS", "").lower() in ("1", "true", "yes"),
        help="also batch the encodes of clicks already waiting together (off: measured on an "
        "H200, batching makes clicks that arrive together wait longer on average; "
        "$TAPMASK_ENCODE_BATCH_CLICKS)",
    )
    _setting(
        parser,
        "--shared-embeddings-mb",
        "TAPMASK_SHARED_EMBEDDINGS_MB",
        float,
        4096,
        "bound of the embeddings shared through Redis, all workers together; 0 disables",
    )
    _setting(
        parser,
        "--shared-embedding-ttl",
        "TAPMASK_SHARED_EMBEDDING_TTL",
        int,
        3600,
        "seconds a shared embedding lives after its last use",
    )
    _setting(
        parser,
        "--shared-embedding-max-mb",
        "TAPMASK_SHARED_EMBEDDING_MAX_MB",
        float,
        64,
        "embeddings larger than this are not shared",
    )
    _setting(
        parser,
        "--shared-track-states-mb",
        "TAPMASK_SHARED_TRACK_STATES_MB",
        float,
        1024,
        "bound of the video trackers' per-object states shared through Redis (fp16), all "
        "workers together; 0 disables (the next frame on another worker re-initialises)",
    )
    _setting(
        parser,
        "--shared-track-state-ttl",
        "TAPMASK_SHARED_TRACK_STATE_TTL",
        int,
        8 * 3600,
        "seconds a shared tracker state lives after its last use (CVAT's signed states: 8 h)",
    )
    timeout = os.environ.get("TAPMASK_JOB_TIMEOUT", "")
    parser.add_argument(
        "--job-timeout",
        type=int,
        default=int(float(timeout)) if timeout.strip() else None,
        help="seconds any one job may run here, whatever its front end asked for: a worker "
        "told to stop (SIGTERM) is done within it ($TAPMASK_JOB_TIMEOUT, the front ends' "
        "setting; default: each job's own timeout)",
    )
    parser.add_argument(
        "--queue-kinds",
        default=os.environ.get("TAPMASK_WORKER_QUEUE_KINDS", "interactive,batch"),
        help="which queues of its models to listen to: interactive, batch or both, interactive "
        "first ($TAPMASK_WORKER_QUEUE_KINDS; default interactive,batch). A batch-only worker "
        "takes prefetches and pre-annotation, never a click",
    )
    metrics_port = os.environ.get("TAPMASK_WORKER_METRICS_PORT", "")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(metrics_port) if metrics_port.strip() else None,
        help="serve Prometheus metrics on this port, 0 for any free one "
        "($TAPMASK_WORKER_METRICS_PORT; default: no metrics endpoint)",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("TAPMASK_WORKER_METRICS_HOST", "0.0.0.0"),
        help="address of the metrics endpoint ($TAPMASK_WORKER_METRICS_HOST; default 0.0.0.0)",
    )
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--max-jobs", type=int, help="exit after this many jobs")


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """``tapmask workers``: which pool to list."""
    _add_redis_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def print_pool(args: argparse.Namespace) -> int:
    """``tapmask workers``: live workers, their models and state, and queue depths."""
    import json
    import time

    from backends.redis.connection import connect, redis_errors_as_unavailable
    from backends.redis.presence import known_models, live_workers, queue_depths
    from backends.redis.protocol import Keys

    keys = Keys(args.namespace)
    connection = connect(args.redis_url, socket_timeout=5.0)
    with redis_errors_as_unavailable(f"Redis at {args.redis_url}"):
        workers = live_workers(connection, keys)
        models = known_models(connection, keys, workers)
        queues = queue_depths(connection, keys, models)
    if args.json:
        print(json.dumps({"workers": workers, "queues": queues}, indent=2))
        return 0
    print(f"{len(workers)} live worker(s)")
    print(
        f"{'WORKER':34} {'STATE':9} {'DEVICE':8} {'QUEUES':7} {'JOBS':>6} {'ERR':>5} "
        f"{'BEAT':>6} {'METRICS':>7}  MODELS"
    )
    for w in workers:
        beat = f"{time.time() - float(w.get('heartbeat', 0)):.1f}s"
        print(
            f"{w['name'][:34]:34} {w.get('state', '?'):9} {str(w.get('device') or '-')[:8]:8} "
            f"{_kinds(keys, w):7} {w.get('jobs', 0):>6} {w.get('errors', 0):>5} {beat:>6} "
            f"{w.get('metrics_port') or '-':>7}  " + ",".join(w.get("models", []))
        )
    print()
    print(f"{'MODEL':24} {'INTERACTIVE':>11} {'BATCH':>7}  WORKERS")
    for model in models:
        serving = sum(model in w.get("models", []) for w in workers)
        q = queues[model]
        print(f"{model[:24]:24} {q['interactive']:>11} {q['batch']:>7}  {serving}")
    return 0


def _kinds(keys, record: dict) -> str:
    """``i+b``, ``i`` or ``b``: the queue kinds a worker listens to (a batch-only worker never
    takes a click)."""
    kinds = {parsed[1] for q in record.get("queues", []) if (parsed := keys.parse_queue(str(q)))}
    return "+".join(k[0] for k in ("interactive", "batch") if k in kinds) or "-"
