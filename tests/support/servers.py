"""Real servers for the limit tests: the Label Studio backend as its own process, and image hosts
that misbehave (answer, then stall or trickle).

``BackendProcess`` runs ``python -m backends.cli serve labelstudio`` exactly as a user does, so
timings are a real server's and memory is that process's resident set (``/proc/<pid>/status``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "backends.cli", "serve", "labelstudio"]


class BackendProcess:
    """``tapmask serve labelstudio`` on a free loopback port, with ``env`` on top of ours."""

    def __init__(self, env: dict[str, str], log_path: Path, startup_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [*SERVE, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited at start-up:\n{self.log()}")
            try:
                if self.http.get("/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"backend not up in {startup_timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` memory field in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def reset_peak_rss(self) -> bool:
        """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is refused."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class MisbehavingImageHost:
    """An HTTP server whose images never finish.

    ``/stall``: 200 with a Content-Length of 10,000, 100 bytes of PNG, then silence.
    ``/trickle``: the same, then one byte every ``trickle_every`` seconds (no read ever waits
    long enough for a read timeout; only a deadline on the whole download ends it).
    """

    def __init__(self, trickle_every: float = 0.2) -> None:
        self.trickle_every = trickle_every
        self.stop = threading.Event()
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                host.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "10000")
                self.end_headers()
                try:
                    self.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 92)
                    self.wfile.flush()
                    if self.path.startswith("/trickle"):
                        while not host.stop.wait(host.trickle_every):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                    else:
                        host.stop.wait()
                except OSError:  # the client gave up: what it should do
                    pass

        return Handler
