"""The images' entry point and health check scripts, run here for real: the health check against
a real Label Studio backend, a real redis-server and a real worker.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker_files import ENTRYPOINT, HEALTHCHECK, REPO
from tests.support.processes import free_port

# --------------------------------------------------------------------------------------------
# The entry point


@pytest.fixture
def fake_path(tmp_path: Path) -> Path:
    """A PATH with a fake ``tapmask``, ``processor`` and ``python`` that print their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("tapmask", "processor", "python"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name}" "$@"\n')
        script.chmod(0o755)
    return bin_dir


def run_entrypoint(fake_path: Path, *args: str) -> str:
    env = {"PATH": f"{fake_path}:/usr/bin:/bin"}
    done = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "tapmask"),
        (("serve", "labelstudio"), "tapmask serve labelstudio"),
        (("worker", "--models", "grabcut"), "tapmask worker --models grabcut"),
        (("-v", "models"), "tapmask -v models"),
        (("eval", "--model", "grabcut"), "tapmask eval --model grabcut"),  # a shell builtin
        (("processor",), "processor"),  # nuclio's CMD ["processor"]
        (("python", "-c", "pass"), "python -c pass"),
    ],
)
def test_entrypoint_runs_tapmask_subcommands_and_programs(fake_path, args, expected) -> None:
    assert run_entrypoint(fake_path, *args) == expected


def test_entrypoint_runs_paths(fake_path) -> None:
    assert run_entrypoint(fake_path, "/bin/echo", "hi") == "hi"


def test_entrypoint_is_executable() -> None:
    for script in (ENTRYPOINT, HEALTHCHECK):
        assert script.stat().st_mode & stat.S_IXUSR, script
        assert script.read_text().startswith("#!")


def test_no_subcommand_is_a_program_name() -> None:
    """The entry point runs a program of that name instead of ``tapmask NAME``: no tapmask
    subcommand may be a program in a Debian image's system PATH."""
    from backends.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for name in subparsers.choices:
        assert shutil.which(name, path=system_path) is None, name


# --------------------------------------------------------------------------------------------
# The health check


@pytest.fixture(scope="module")
def hc():
    spec = importlib.util.spec_from_file_location("tapmask_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("command", "mode"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/tapmask", "serve", "labelstudio"], "labelstudio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "serve", "labelstudio"], "labelstudio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint"], "labelstudio"),  # image default
        (["python", "/opt/venv/bin/tapmask", "-v", "worker", "--models", "grabcut"], "worker"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "worker", "--models", "x"], "worker"),
        (["/opt/venv/bin/python", "-m", "backends.cli", "worker", "--models", "grabcut"], "worker"),
        (["/opt/venv/bin/python", "-m", "backends.cli", "workers"], "none"),
        (["processor"], "nuclio"),
        (["/usr/local/bin/processor"], "nuclio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "processor"], "nuclio"),
        (["python", "/opt/venv/bin/tapmask", "segment", "a.png", "--out", "m.png"], "none"),
        (["bash"], "none"),
        ([], "none"),
    ],
)
def test_healthcheck_detects_the_role(hc, command, mode) -> None:
    assert hc.detect(command)[0] == mode


def test_healthcheck_options(hc) -> None:
    args = ["serve", "labelstudio", "--port", "9000", "--host=10.0.0.1", "--port=9001"]
    assert hc.option(args, "--port") == "9001" and hc.option(args, "--host") == "10.0.0.1"
    assert hc.option(args, "--name") is None
    assert hc._safe("redis://:secret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert hc._safe("redis://redis:6379/0") == "redis://redis:6379/0"


def test_healthcheck_passes_commands_it_cannot_check(hc) -> None:
    assert "nothing to check" in hc.run([], command=["bash"])


def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "TAPMASK_"))}
    clean["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )
    return done.returncode, done.stdout.strip()


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    """A real ``tapmask serve labelstudio`` (GrabCut, in-process) behind basic auth."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPMASK_REDIS")}
    env.update(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backends.cli",
            "serve",
            "labelstudio",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            "grabcut",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "the backend exited"
            assert time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_healthcheck_labelstudio(backend) -> None:
    auth = {"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"}
    code, out = run_healthcheck("labelstudio", "--port", str(backend), env=auth)
    assert code == 0 and "UP" in out, out
    code, out = run_healthcheck("labelstudio", "--port", str(backend))
    assert code == 1 and "401" in out, out  # the container's credentials are needed
    code, out = run_healthcheck("labelstudio", "--port", str(free_port()), "--timeout", "1")
    assert code == 1 and out.startswith("unhealthy"), out


def test_healthcheck_auto_reads_the_port_from_the_command(hc, backend, monkeypatch) -> None:
    monkeypatch.setenv("BASIC_AUTH_USER", "ann")
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    command = [
        "/opt/venv/bin/python",
        "/opt/venv/bin/tapmask",
        "serve",
        "labelstudio",
        "--port",
        str(backend),
    ]
    assert "UP" in hc.run([], command=command)
    monkeypatch.setenv("PORT", str(backend))
    assert "UP" in hc.run([], command=["tapmask", "serve", "labelstudio"])


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_url(hc) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ready"
    try:
        assert "OK" in hc.run(["url", url])
        _Ready.status = 503
        with pytest.raises(hc.Unhealthy, match="503"):
            hc.run(["url", url])
    finally:
        _Ready.status = 200
        server.shutdown()
        server.server_close()
    assert hc.NUCLIO_READY_URL == "http://127.0.0.1:8082/ready"  # nuclio's own HEALTHCHECK URL


@pytest.fixture(scope="module")
def redis_server():
    assert shutil.which("redis-server"), "redis-server missing (.ci/run installs it)"
    from tests.support.processes import RedisServer

    with RedisServer() as server:
        yield server


def test_healthcheck_worker(redis_server, tmp_path) -> None:
    from tests.support.processes import WorkerProcess

    url = redis_server.url
    code, out = run_healthcheck("redis", "--redis-url", url)
    assert code == 0, out
    code, out = run_healthcheck("worker", "--redis-url", url)
    assert code == 1 and "no live worker" in out, out

    worker = WorkerProcess(
        url, ["grabcut"], name=f"{socket.gethostname()}.hc.1", log_dir=str(tmp_path)
    )
    try:
        worker.wait_ready(redis_server.client(), timeout=60)
        code, out = run_healthcheck("worker", env={"TAPMASK_REDIS_URL": url})
        assert code == 0 and "grabcut" in out, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--name", worker.name)
        assert code == 0, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--name", "someone-else")
        assert code == 1, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--namespace", "other")
        assert code == 1, out
    finally:
        worker.stop(timeout=10)
    code, out = run_healthcheck("worker", "--redis-url", url)
    assert code == 1, out  # a worker that stopped deregistered (or its presence expired)

    dead = f"redis://127.0.0.1:{free_port()}/0"
    code, out = run_healthcheck("redis", "--redis-url", dead, "--timeout", "1")
    assert code == 1 and "does not answer" in out, out
    code, out = run_healthcheck("worker", "--redis-url", dead, "--timeout", "1")
    assert code == 1, out
