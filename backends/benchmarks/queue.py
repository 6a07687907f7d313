"""Queue rows: the Redis/rq path against the in-process dispatcher, on one machine.

* round-trip overhead of a click through Redis + a worker process vs ``LocalDispatcher``, for a
  model that does nothing (p50 and p99; target: at most 3 ms added at p50);
* throughput of two workers vs one on a CPU-bound, single-threaded model (target >= 1.7x; it
  needs two free cores: on a shared machine the ratio shows how many were free);
* bytes sent to Redis per follow-up click, with image dedup (only the key travels) vs without
  (the bytes every time);
* a lone first click (an encode) through a worker that batches encodes (the default: prefetches
  only; and with ``--encode-batch-clicks``) vs one that never batches (``--encode-batch 1``):
  batching must not make a lone click slower.

Everything runs against a private ``redis-server`` on a free port and worker processes started
here (``--plugin backends.benchmarks.queue`` registers the two bench models); all are stopped
at the end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from backends import images
from backends.benchmarks import BenchRow
from backends.models.registry import ModelSpec, register
from backends.prompts import Click, Prompt, Segmentation

PLUGIN = "backends.benchmarks.queue"
SPIN_ITERATIONS = int(os.environ.get("TAPMASK_BENCH_SPIN", 400_000))  # ~40 ms of one core


class NoopModel:
    """No encoder, a decode that only marks the click pixel: what is left is transport."""

    replays_history = False

    def __init__(self, name: str = "bench-noop") -> None:
        self.name = name

    def encode(self, image: np.ndarray) -> None:
        return None

    def decode(self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any):
        mask = np.zeros(image.shape[:2], bool)
        for click in prompt.positives:
            mask[int(click.y), int(click.x)] = True
        return Segmentation(mask, 1.0, self.name), None


class SpinModel(NoopModel):
    """CPU-bound and single-threaded by construction (a pure-Python loop holds one core)."""

    def __init__(self, name: str = "bench-spin", iterations: int = SPIN_ITERATIONS) -> None:
        super().__init__(name)
        self.iterations = iterations

    def decode(self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any):
        total = 0
        for i in range(self.iterations):
            total += i * i
        return super().decode(image, embedding, prompt, state)


class EncodingModel(NoopModel):
    """An encoder (~10 ms of one core per image) that can batch: a lone first click encodes."""

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encode_batch([image])[0]

    def encode_batch(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        total = 0
        for i in range(SPIN_ITERATIONS // 4 * len(frames)):
            total += i * i
        return [np.full(16, float(frame.mean()), np.float32) for frame in frames]


def build(name: str, device: str | None = None) -> NoopModel:
    if name.startswith("bench-encode"):
        return EncodingModel(name)
    return SpinModel(name) if name == "bench-spin" else NoopModel(name)


register(ModelSpec("bench-noop", f"{PLUGIN}:build", "bench: does nothing"))
register(ModelSpec("bench-spin", f"{PLUGIN}:build", "bench: ~40 ms of one CPU core per click"))
for _flavour in ("plain", "batching", "clicks"):
    register(ModelSpec(f"bench-encode-{_flavour}", f"{PLUGIN}:build", "bench: a batching encoder"))


def _image(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return images.encode_png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _prompt(i: int, width: int, height: int) -> Prompt:
    return Prompt((Click(i % width, (i // width) % height),))  # never a cached state


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _overhead(url: str, connection, start_worker) -> list[BenchRow]:
    from backends.dispatch import LocalDispatcher
    from backends.engine import Engine
    from backends.redis.dispatcher import RedisDispatcher

    start_worker("bench-overhead", ["bench-noop"])
    local = LocalDispatcher(Engine({"bench-noop": NoopModel()}))
    remote = RedisDispatcher(url, ["bench-noop"])
    width, height, n = 64, 48, 400
    image = _image(width, height)
    local_t: list[float] = []
    remote_t: list[float] = []
    try:
        for i in range(-50, n):  # interleaved, so both see the same machine load
            for dispatcher, times in ((local, local_t), (remote, remote_t)):
                started = time.perf_counter()
                dispatcher.segment("bench-noop", image, _prompt(i + 50, width, height))
                if i >= 0:
                    times.append(time.perf_counter() - started)
    finally:
        local.close()
        remote.close()
    p50 = (statistics.median(remote_t), statistics.median(local_t))
    p99 = (_percentile(remote_t, 0.99), _percentile(local_t, 0.99))
    added = p50[0] - p50[1]
    return [
        BenchRow(
            "queue: no-op click p50, Redis+worker vs in-process",
            p50[0],
            p50[1],
            target="<= 3 ms added at p50",
            passed=added <= 0.003,
            show_ratio=False,
            note=f"added {added * 1000:.2f} ms at p50 over {n} clicks",
        ),
        BenchRow(
            "queue: no-op click p99, Redis+worker vs in-process",
            p99[0],
            p99[1],
            show_ratio=False,
            note=f"added {(p99[0] - p99[1]) * 1000:.2f} ms at p99",
        ),
    ]


def _spin_in_processes(processes: int, rounds: int = 12) -> float:
    """Rounds of the same spin per second, in ``processes`` plain processes (no queue): the
    scaling this machine allows right now."""
    code = (
        "from backends.benchmarks.queue import SpinModel;import numpy as np;"
        "from backends.prompts import Prompt, Click;m=SpinModel();i=np.zeros((4,4,3),np.uint8)\n"
        f"for _ in range({rounds}): m.decode(i, None, Prompt((Click(1, 1),)), None)"
    )
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    for proc in procs:
        proc.wait()
    return processes * rounds / (time.perf_counter() - started)


def _throughput(url: str, connection, start_worker) -> list[BenchRow]:
    from backends.redis.dispatcher import RedisDispatcher

    dispatcher = RedisDispatcher(url, ["bench-spin"], job_timeout=120, queue_ttl=60)
    width, height, jobs = 64, 48, 48
    image = _image(width, height, seed=1)
    counter = iter(range(10**9))

    def run(n: int) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda _: dispatcher.segment(
                        "bench-spin", image, _prompt(next(counter), width, height)
                    ),
                    range(n),
                )
            )
        return n / (time.perf_counter() - started)

    try:
        start_worker("bench-spin-1", ["bench-spin"])
        run(4)
        one = run(jobs)
        start_worker("bench-spin-2", ["bench-spin"])
        run(4)
        before = [
            int(connection.hget(f"rq:worker:bench-spin-{i}", "successful_job_count") or 0)
            for i in (1, 2)
        ]
        two = run(jobs)
        split = [
            int(connection.hget(f"rq:worker:bench-spin-{i}", "successful_job_count") or 0) - b
            for i, b in zip((1, 2), before, strict=True)
        ]
    finally:
        dispatcher.close()
    ceiling = _spin_in_processes(2) / _spin_in_processes(1)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return [
        BenchRow(
            "queue: CPU-bound clicks/s, 2 workers vs 1",
            two,
            one,
            unit="jobs/s",
            higher_is_better=True,
            target=">= 1.7x with 2 workers",
            passed=two / one >= 1.7,
            note=f"speed-up {two / one:.2f}x, jobs split {split[0]}:{split[1]}; the same spin in "
            f"2 plain processes vs 1 gets {ceiling:.2f}x here ({cores} cores, load {load:.1f})",
        )
    ]


def _bytes_per_click(url: str, connection, start_worker) -> list[BenchRow]:
    from backends.redis.dispatcher import RedisDispatcher

    start_worker("bench-bytes", ["bench-noop"])
    width, height, clicks = 800, 600, 20
    rows = []
    measured = {}
    for dedup in (True, False):
        image = _image(width, height, seed=2 + dedup)
        dispatcher = RedisDispatcher(url, ["bench-noop"], dedup_images=dedup)
        try:
            dispatcher.segment("bench-noop", image, _prompt(0, width, height))  # first click
            before = int(connection.info("stats")["total_net_input_bytes"])
            for i in range(1, clicks + 1):
                dispatcher.segment("bench-noop", image, _prompt(i, width, height))
            after = int(connection.info("stats")["total_net_input_bytes"])
        finally:
            dispatcher.close()
        measured[dedup] = ((after - before) / clicks, len(image))
    (with_dedup, size), (without, _) = measured[True], measured[False]
    rows.append(
        BenchRow(
            "queue: bytes to Redis per follow-up click, dedup vs resend",
            with_dedup,
            without,
            unit="B",
            target="image bytes sent once",
            passed=with_dedup < size / 10,
            note=f"{width}x{height} PNG of {size / 1e6:.2f} MB; all clients' input bytes "
            "(dispatcher + worker) counted by redis INFO",
        )
    )
    return rows


def _lone_first_click(url: str, connection, start_worker) -> list[BenchRow]:
    from backends.redis.dispatcher import RedisDispatcher

    flavours = {
        "plain": ["--encode-batch", "1"],
        "batching": [],  # the defaults
        "clicks": ["--encode-batch-clicks"],
    }
    for flavour, args in flavours.items():
        start_worker(f"bench-{flavour}", [f"bench-encode-{flavour}"], args)
    dispatcher = RedisDispatcher(url, job_timeout=30)
    times: dict[str, list[float]] = {flavour: [] for flavour in flavours}
    try:
        for i in range(40):  # a new image every time: every click is a first click
            image = _image(64, 48, seed=1000 + i)
            for flavour, samples in times.items():
                started = time.perf_counter()
                dispatcher.segment(f"bench-encode-{flavour}", image, _prompt(1, 64, 48))
                samples.append(time.perf_counter() - started)
    finally:
        dispatcher.close()
    plain = statistics.median(times["plain"])
    rows = []
    for flavour, label in (("batching", "default batching"), ("clicks", "--encode-batch-clicks")):
        ours = statistics.median(times[flavour])
        rows.append(
            BenchRow(
                f"queue: lone first click p50, {label} vs no batching",
                ours,
                plain,
                target="not slower (within 10 %)",
                passed=ours <= plain * 1.10,
                note="40 first clicks each, interleaved; ~10 ms encoder",
            )
        )
    return rows


def run() -> list[BenchRow]:
    from backends.benchmarks.redis_procs import RedisServer, WorkerProcess

    rows: list[BenchRow] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as logs:
        connection = server.client()
        workers: list[WorkerProcess] = []

        def start_worker(name: str, models: list[str], args: list[str] = ()) -> WorkerProcess:
            worker = WorkerProcess(
                server.url,
                models,
                name=name,
                plugins=[PLUGIN],
                heartbeat=2.0,
                log_dir=logs,
                extra_args=list(args),
            )
            workers.append(worker)
            return worker.wait_ready(connection)

        def stop_workers() -> None:
            while workers:
                workers.pop().stop()

        try:
            for part in (_overhead, _throughput, _bytes_per_click, _lone_first_click):
                try:
                    rows.extend(part(server.url, connection, start_worker))
                finally:
                    stop_workers()
        finally:
            stop_workers()
            connection.close()
    return rows
