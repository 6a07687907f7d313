"""Redis clients that fail fast, and Redis failures as ``Unavailable`` (503)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backends.errors import Unavailable

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url(url: str | None = None) -> str:
    """``url``, else ``$TAPMASK_REDIS_URL``, else the local default."""
    return url or os.environ.get("TAPMASK_REDIS_URL") or DEFAULT_URL


def connect(
    url: str | None = None, *, socket_timeout: float = 10.0, retries: int = 1
) -> redis.Redis:
    """A client that fails fast when Redis is down (one immediate retry: a pooled connection
    that died with a Redis restart reconnects on that retry instead of failing the request)."""
    return redis.Redis.from_url(
        redis_url(url),
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries),
        health_check_interval=30,
    )


def redis_location(connection: redis.Redis) -> str:
    """``host:port`` (or the socket path) of a client, never its password."""
    kwargs = connection.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


@contextmanager
def redis_errors_as_unavailable(what: str = "Redis") -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise Unavailable(f"{what} is unreachable: {exc}") from exc
