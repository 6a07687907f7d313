"""``bench-gpu``'s serving rows: cached clicks through a real worker and Redis on the device,
and a real CUDA out-of-memory answered 503 while the next click is served."""

from __future__ import annotations

import gc
import os
import shutil
import time
from typing import Any

from backends.benchmarks.gpu import Plan, _build, _clicks, _frame, _percentile
from backends.benchmarks.gpu_rows import WorkerRow
from backends.prompts import Click, Prompt


def _redis_server() -> str | None:
    return os.environ.get("TAPMASK_REDIS_SERVER") or shutil.which("redis-server")


def measure_worker(device: str, p: Plan) -> WorkerRow | None:
    """Cached clicks through a real worker process and Redis on this device, vs in-process."""
    from backends.benchmarks.redis_procs import RedisServer, WorkerProcess
    from backends.engine import Engine
    from backends.images import encode_png
    from backends.models import registry
    from backends.redis.dispatcher import RedisDispatcher

    binary = _redis_server()
    if binary is None:
        return None
    height, width = p.frame
    png = encode_png(_frame(height, width, 7))
    prompts = _clicks(width, height, p.clicks, seed=3)

    def timed(segment: Any) -> list[float]:
        segment(prompts[0])  # the encode
        times = []
        for prompt in prompts[1:]:
            started = time.perf_counter()
            segment(prompt)
            times.append(time.perf_counter() - started)
        return times

    model = p.worker_model
    local = Engine({model: registry.create(model, device=device)})
    in_process = timed(lambda prompt, engine=local: engine.segment(model, png, prompt))
    del local
    gc.collect()
    with RedisServer(binary=binary) as server:
        worker = WorkerProcess(
            server.url,
            [model],
            name="bench-gpu",
            plugins=["backends.benchmarks.gpu"],
            extra_args=["--device", device],
        )
        try:
            worker.wait_ready(server.client(), timeout=300)
            dispatcher = RedisDispatcher(server.url, job_timeout=120, queue_ttl=30)
            through = timed(lambda prompt: dispatcher.segment(model, png, prompt))
            dispatcher.close()
        finally:
            worker.stop()
    return WorkerRow(
        model,
        _percentile(in_process, 50) * 1000,
        _percentile(in_process, 99) * 1000,
        _percentile(through, 50) * 1000,
        _percentile(through, 99) * 1000,
        note=f"{len(through)} cached clicks each, {width}×{height} frame",
    )


def check_out_of_memory(device: str) -> str:
    """A real CUDA out-of-memory during a click: the Engine answers 503 and serves the next one.

    Takes nearly all free device memory, asks for an encode (which cannot fit), releases the
    memory, and asks again. CUDA only: a CPU cannot be made to run out of memory safely.
    """
    import torch

    from backends.engine import Engine
    from backends.errors import DeviceOutOfMemory
    from backends.images import encode_png

    if not device.startswith("cuda"):
        return "out-of-memory check: CUDA only (tested on the CPU with an injected fault)"
    engine = Engine({"sam": _build("sam-vit_b", "bf16", device, {})})
    png = encode_png(_frame(1080, 1920, 11))
    prompt = Prompt((Click(960.0, 540.0),))
    torch.cuda.empty_cache()  # what the allocator holds would otherwise still serve the encode
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(int(free) - (16 << 20), dtype=torch.uint8, device=device)
    try:
        engine.segment("sam", png, prompt)
        outcome = "no out-of-memory happened (the hog was too small)"
    except DeviceOutOfMemory as exc:
        outcome = f"{exc.status} {exc.code}"
    finally:
        del hog
        torch.cuda.empty_cache()
    served = engine.segment("sam", png, prompt)
    return (
        f"out-of-memory check: first click answered {outcome}; after freeing, the next click "
        f"was served ({served.area} px), out_of_memory={engine.stats.out_of_memory}"
    )
