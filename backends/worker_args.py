"""Command-line arguments of ``tapmask worker`` and ``tapmask workers`` (stdlib only).

Kept apart from ``backends.worker`` so that building the ``tapmask`` parser does not import
rq, redis or the Engine; ``backends.worker`` re-exports both functions.
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


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=float(os.environ.get("TAPMASK_WORKER_HEARTBEAT", 1.0)),
        help="seconds between heartbeats; the presence key lives 5 heartbeats (default 1)",
    )
    parser.add_argument(
        "--shared-embeddings-mb",
        type=float,
        default=float(os.environ.get("TAPMASK_SHARED_EMBEDDINGS_MB", 4096)),
        help="bound of the embeddings shared through Redis, all workers together; 0 disables",
    )
    parser.add_argument(
        "--shared-embedding-ttl",
        type=int,
        default=int(os.environ.get("TAPMASK_SHARED_EMBEDDING_TTL", 3600)),
        help="seconds a shared embedding lives after its last use (default 3600)",
    )
    parser.add_argument(
        "--shared-embedding-max-mb",
        type=float,
        default=64,
        help="embeddings larger than this are not shared (default 64)",
    )
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--max-jobs", type=int, help="exit after this many jobs")


def add_workers_arguments(parser: argparse.ArgumentParser) -> None:
    _add_redis_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
