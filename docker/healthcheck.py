#!/usr/bin/env python3
"""Container health check of the tapmask images: ``tapmask-healthcheck [MODE] [OPTIONS]``.

One image runs several things (the Label Studio backend, rq workers, nuclio functions built FROM
it), so the image's ``HEALTHCHECK`` runs this script in ``auto`` mode, and compose services may
name the mode they want.

Modes:
  auto          (default) look at the container's command line (PID 1, through docker-init or
                tini) and check what it runs: ``tapmask serve labelstudio`` -> labelstudio,
                ``tapmask worker`` / ``python -m backends.cli worker`` -> worker, nuclio's
                ``processor`` -> nuclio; any other command passes (nothing long-running to check)
  labelstudio   ``GET http://127.0.0.1:PORT/health`` answers 200 ``{"status": "UP"}`` (with the
                container's BASIC_AUTH_USER/BASIC_AUTH_PASS when set)
  worker        Redis answers and a live tapmask worker of this container (same hostname, or
                ``--name``) keeps its presence key fresh in Redis
  redis         Redis answers PING
  nuclio        nuclio's processor answers ``GET http://127.0.0.1:8082/ready``
  url URL       ``GET URL`` answers 2xx

Options (auto mode reads them from the command line it checks): ``--port`` (labelstudio;
default $PORT or 9090), ``--redis-url`` (default $TAPMASK_REDIS_URL), ``--namespace`` (default
$TAPMASK_REDIS_NAMESPACE or tapmask), ``--name`` (worker name), ``--timeout`` seconds.

Exit status 0 when healthy, 1 when not (Docker's convention), with one line on stdout that
``docker inspect --format '{{json .State.Health}}'`` shows. Standard library only, except the
worker and redis modes, which use the image's ``redis`` package and tapmask's key layout.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_PORT = 9090
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
NUCLIO_READY_URL = "http://127.0.0.1:8082/ready"
MODES = ("auto", "labelstudio", "worker", "redis", "nuclio", "url")
INIT_PROGRAMS = {"docker-init", "tini", "tini-static", "dumb-init"}
ENTRY_PROGRAMS = {"tapmask", "tapmask-entrypoint"}


class Unhealthy(Exception):
    """The checked service is not healthy (the message says why)."""


# --------------------------------------------------------------------------------------------
# What the container runs


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def detect(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``(mode, args)`` for a container command line: which check fits, and the arguments of
    the tapmask subcommand (to read ``--port``, ``--redis-url``… from). ``"none"`` when the
    command is nothing this script knows how to check."""
    args = list(argv)
    if args and os.path.basename(args[0]) in INIT_PROGRAMS:
        args = args[args.index("--") + 1 :] if "--" in args else args[1:]
    names = [os.path.basename(a) for a in args]
    if names and names[0] == "processor":
        return "nuclio", []
    for i, name in enumerate(names):
        module = name == "-m" and i + 1 < len(args) and args[i + 1] == "backends.cli"
        if module or name in ENTRY_PROGRAMS:
            rest = args[i + 2 :] if module else args[i + 1 :]
            if rest and os.path.basename(rest[0]) == "processor":
                return "nuclio", []
            words = [a for a in rest if not a.startswith("-")]
            if words[:2] == ["serve", "labelstudio"]:
                return "labelstudio", rest
            if words[:1] == ["worker"]:
                return "worker", rest
            # `tapmask-entrypoint` with no argument runs the image's default command, which
            # is only known to the image: assume tapmask's default, the Label Studio backend.
            if name == "tapmask-entrypoint" and not words:
                return "labelstudio", rest
            return "none", rest
    return "none", args


def container_command() -> list[str]:
    """PID 1's command line (the container's main process, or docker-init/tini in front of it)."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


# --------------------------------------------------------------------------------------------
# Checks


def http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"GET {url} answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unhealthy(f"GET {url} failed: {reason}") from exc


def check_url(url: str, timeout: float) -> str:
    http_get(url, timeout)
    return f"GET {url}: OK"


def check_labelstudio(port: int, timeout: float, host: str = "127.0.0.1") -> str:
    url = f"http://{host}:{port}/health"
    headers = {}
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    body = http_get(url, timeout, headers)
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError) as exc:
        raise Unhealthy(f"GET {url}: not the tapmask backend's JSON: {body[:80]!r}") from exc
    if status != "UP":
        raise Unhealthy(f"GET {url}: status {status!r}")
    return f"Label Studio backend on :{port} is UP"


def _redis(url: str, timeout: float):
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the images always have it
        raise Unhealthy(f"the redis package is missing: {exc}") from exc
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def check_redis(url: str, timeout: float) -> str:
    try:
        _redis(url, timeout).ping()
    except Exception as exc:  # any client error means "not reachable" here
        raise Unhealthy(f"Redis at {_safe(url)} does not answer: {exc}") from exc
    return f"Redis at {_safe(url)} answers"


def check_worker(url: str, namespace: str, name: str | None, timeout: float) -> str:
    """This container's worker is registered and its presence key (a heartbeat with a TTL of a
    few seconds) is fresh: the process is alive, connected, and not wedged."""
    try:
        from backends.redis.presence import live_workers
        from backends.redis.protocol import Keys
    except ImportError:  # tapmask without the queue: Redis reachability is all we can check
        return check_redis(url, timeout)
    connection = _redis(url, timeout)
    try:
        workers = live_workers(connection, Keys(namespace))
    except Exception as exc:
        raise Unhealthy(f"Redis at {_safe(url)} does not answer: {exc}") from exc
    host = socket.gethostname()
    if name:
        mine = [w for w in workers if w.get("name") == name]
    else:  # default worker names are host.pid.random; presence records carry the hostname
        mine = [
            w
            for w in workers
            if w.get("hostname") == host or str(w.get("name", "")).startswith(host + ".")
        ]
    if not mine:
        who = f"worker {name!r}" if name else f"worker of host {host!r}"
        raise Unhealthy(
            f"no live {who} in Redis at {_safe(url)} (namespace {namespace!r}; "
            f"{len(workers)} live worker(s) in all): still loading its models, or gone"
        )
    parts = [
        f"{w.get('name')} {w.get('state', '?')} [{','.join(w.get('models', []))}]" for w in mine
    ]
    return "worker " + "; ".join(parts)


def _safe(url: str) -> str:
    """``url`` without a password (``redis://:secret@host`` -> ``redis://:***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


# --------------------------------------------------------------------------------------------
# Command line


def run(argv: Sequence[str] | None = None, command: Sequence[str] | None = None) -> str:
    """Run the check ``argv`` asks for; return the healthy message or raise ``Unhealthy``.
    ``command`` stands for PID 1's command line in auto mode (tests)."""
    parser = argparse.ArgumentParser(prog="tapmask-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="auto", choices=MODES)
    parser.add_argument("url", nargs="?", help="for the url mode")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis-url")
    parser.add_argument("--namespace")
    parser.add_argument("--name")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    mode, cmd_args = args.mode, []
    if mode == "auto":
        command = container_command() if command is None else list(command)
        mode, cmd_args = detect(command)
        if mode == "none":
            return f"nothing to check for {' '.join(command)[:120] or 'this container'!r}"

    def setting(flag: str, env: str, default: str | None) -> str | None:
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        return given or option(cmd_args, flag) or os.environ.get(env) or default

    if mode == "labelstudio":
        port = args.port or option(cmd_args, "--port") or os.environ.get("PORT") or DEFAULT_PORT
        host = option(cmd_args, "--host") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return check_labelstudio(int(port), args.timeout, host)
    if mode == "nuclio":
        return check_url(NUCLIO_READY_URL, args.timeout)
    if mode == "url":
        if not args.url:
            parser.error("the url mode needs a URL")
        return check_url(args.url, args.timeout)
    url = setting("--redis-url", "TAPMASK_REDIS_URL", DEFAULT_REDIS_URL)
    assert url is not None
    if mode == "redis":
        return check_redis(url, args.timeout)
    namespace = setting("--namespace", "TAPMASK_REDIS_NAMESPACE", "tapmask") or "tapmask"
    return check_worker(url, namespace, args.name or option(cmd_args, "--name"), args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        print(run(argv))
    except Unhealthy as exc:
        print(f"unhealthy: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
