"""Waiting for one job's reply: rq's result stream read in slices, with the pool checked between
them (was the job taken? is the worker running it still alive?).

Kept apart from the dispatcher so its three outcomes other than a reply are explicit: the job
expired unanswered (``Expired``: the caller's deadline passed), nobody took it (``Dropped``: its
rq ttl ran out, or no live worker listens to its queue), or its worker died mid-job
(``WorkerLost``: presence gone while the job is started).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.results import Result

from backends.errors import TapmaskError, Unavailable, WorkerReplyError
from backends.redis.presence import is_alive, live_workers
from backends.redis.protocol import Keys


class Expired(Exception):
    """No reply by the caller's deadline."""


class WorkerLost(Exception):
    """The worker running the job stopped (its presence record is gone)."""


class Dropped(Exception):
    """No worker took the job: its rq ttl ran out, or nobody listens to its queue."""


def has_live_worker(connection: redis.Redis, keys: Keys, queue: str) -> bool:
    """A live worker listens to ``queue`` (a batch-only worker takes no interactive job)."""
    return any(queue in w.get("queues", ()) for w in live_workers(connection, keys))


def wait_for_reply(
    connection: redis.Redis,
    keys: Keys,
    job: Job,
    deadline: float,
    *,
    poll_seconds: int,
    has_taker: Callable[[], bool],
) -> dict[str, Any]:
    """The job's reply payload; raises ``Expired``, ``Dropped`` or ``WorkerLost``."""
    polls = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Expired
        block = max(1, min(poll_seconds, math.ceil(remaining)))
        result = job.latest_result(timeout=block)
        if result is not None:
            return reply_payload(result)
        polls += 1
        status, worker = connection.hmget(job.key, "status", "worker_name")
        if status is None:
            result = job.latest_result()  # finished between the two reads?
            if result is not None:
                return reply_payload(result)
            raise Dropped  # its rq ttl expired before any worker took it
        status = status.decode()
        if status == JobStatus.QUEUED and polls == 1 and not has_taker():
            raise Dropped
        alive = worker is not None and is_alive(connection, keys, worker.decode())
        if status == JobStatus.STARTED and not alive:
            raise WorkerLost


def reply_payload(result: Result) -> dict[str, Any]:
    """A finished job's reply dict; a failed or stopped job raises a ``TapmaskError``."""
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
