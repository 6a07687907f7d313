"""A real Label Studio 1.23.2 and the real ``tapmask serve labelstudio`` process, for end-to-end
tests and the pre-annotation bench. Label Studio lives in its own venv (``make test`` installs
it: ``.venv-labelstudio``); ``label_studio_server`` starts one on a free port with a fresh data
folder (about 35 s), and ``start_backend`` starts the backend the way a user does
(``python -m backends.cli serve``). ``tests.support.label_studio`` re-exports these for tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from backends.benchmarks.redis_procs import ROOT, free_port

REPO = ROOT
LS_BIN = Path(os.environ.get("TAPMASK_LABEL_STUDIO", REPO / ".venv-labelstudio/bin/label-studio"))
TOKEN = "e2e-legacy-token-0123456789"


def wait_until_up(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@dataclass
class LabelStudio:
    url: str
    headers: dict[str, str]

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=self.headers, timeout=120, **kw)


@contextmanager
def label_studio_server(data_dir: Path) -> Iterator[LabelStudio]:
    """Label Studio on a free port, its data in ``data_dir``; stopped on exit."""
    assert LS_BIN.exists(), f"{LS_BIN} missing: `make test` installs Label Studio 1.23.2 there"
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "fflag_feat_utc_210_prediction_validation_15082025": "true",
    }
    log = (data_dir / "label-studio.log").open("w")
    process = subprocess.Popen(
        [
            str(LS_BIN),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--username",
            "admin@example.com",
            "--password",
            "e2e-password-123",
            "--user-token",
            TOKEN,
            "--enable-legacy-api-token",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, 300)
        yield LabelStudio(f"http://127.0.0.1:{port}", {"Authorization": f"Token {TOKEN}"})
    finally:
        stop(process)
        log.close()


def start_backend(
    env_extra: dict[str, str], model_args: tuple[str, ...] = ("--model", "grabcut")
) -> tuple[str, subprocess.Popen]:
    """``tapmask serve labelstudio`` on a free port (stop it with ``stop``)."""
    port = free_port()
    env = {**os.environ, **env_extra}
    process = subprocess.Popen(
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
            *model_args,
        ],
        cwd=REPO,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/health", process, 60)
    return url, process
