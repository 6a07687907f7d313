"""Who is alive in the pool: worker presence records and queue depths.

Each worker keeps a short-TTL key ``<ns>:worker:<name>`` holding its ``WorkerInfo`` as JSON
(models, queues, state, current job, counters) and its name in the set ``<ns>:workers``. A
record whose key expired belongs to a dead worker: dispatchers use that to notice a worker
killed mid-job within seconds, and ``tapmask workers`` to list the pool.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from backends.redis.protocol import Keys


@dataclass
class WorkerInfo:
    """A worker's presence record (what ``tapmask workers`` and health checks read)."""

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
    metrics_port: int | None = None  # its Prometheus endpoint (``--metrics-port``), if any

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def write_presence(pipe: Any, keys: Keys, info: WorkerInfo, ttl_seconds: float) -> None:
    """Queue the commands that refresh ``info`` (on a pipeline)."""
    pipe.set(keys.presence(info.name), info.to_json(), px=int(ttl_seconds * 1000))
    pipe.sadd(keys.workers, info.name)


def remove_presence(pipe: Any, keys: Keys, name: str) -> None:
    pipe.delete(keys.presence(name))
    pipe.srem(keys.workers, name)


def is_alive(connection: redis.Redis, keys: Keys, worker: str) -> bool:
    return bool(connection.exists(keys.presence(worker)))


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


def known_models(connection: redis.Redis, keys: Keys, workers: list[dict[str, Any]]) -> list[str]:
    """Models served by a live worker or holding a queue rq knows of."""
    models = {m for w in workers for m in w.get("models", [])}
    for raw in connection.smembers("rq:queues"):
        parsed = keys.parse_queue(raw.decode() if isinstance(raw, bytes) else raw)
        if parsed is not None:
            models.add(parsed[0])
    return sorted(models)


def queue_depths(
    connection: redis.Redis, keys: Keys, models: list[str]
) -> dict[str, dict[str, int]]:
    """Waiting jobs per model and queue kind (running jobs are not counted)."""
    with connection.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.llen(keys.queue_list(keys.interactive(model)))
            pipe.llen(keys.queue_list(keys.batch(model)))
        depths = pipe.execute()
    return {
        model: {"interactive": int(depths[2 * i]), "batch": int(depths[2 * i + 1])}
        for i, model in enumerate(models)
    }
