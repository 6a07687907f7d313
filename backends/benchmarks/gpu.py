"""``tapmask bench-gpu`` (``make bench-gpu DEVICE=cuda|cpu``): what ops size GPU workers from.

One run, one device, real-size architectures with random weights (the cost depends on the
architecture, not the weights; nothing is downloaded), a 1920×1080 frame:

* per model and precision: weights in device memory, image encode time (median), the encode's
  peak memory above the weights (``torch.cuda.max_memory_allocated``), the cached embedding's
  bytes, and a cached click's latency (p50/p99 of clicks decoded through the Engine against the
  cached embedding, each continuing the previous click's state, mask upscaled to the frame);
  SAM ViT-B/L/H in fp32 and bf16 (bf16 autocast is CUDA only), HQ-SAM ViT-H, SAM 2.1 tiny and
  large, EdgeTAM, RITM HRNet18 (per click: RITM has no separate encoder);
* encode throughput, one image at a time vs one batched pass (``encode_batch``);
* where a ``redis-server`` can run (on ``PATH``, or ``$TAPMASK_REDIS_SERVER``): cached clicks
  through a real ``tapmask worker`` on this device vs the same clicks in-process.

``--quick`` shrinks everything (a tiny SAM, a small frame, few repeats) so a test runs the same
code on a CPU in seconds. The table is Markdown, ready for the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from backends.benchmarks.gpu_rows import ModelRow, Report, ThroughputRow, WorkerRow, render
from backends.models.registry import ModelSpec, register
from backends.models.sizes import TINY_SAM
from backends.prompts import Click, Prompt

MiB = float(1 << 20)

#: (registry name, precision) rows, in table order.
MODELS = (
    ("sam-vit_b", "fp32"),
    ("sam-vit_b", "bf16"),
    ("sam-vit_l", "fp32"),
    ("sam-vit_l", "bf16"),
    ("sam-vit_h", "fp32"),
    ("sam-vit_h", "bf16"),
    ("sam-hq-vit-h", "bf16"),
    ("sam2.1-hiera-tiny", "bf16"),
    ("sam2.1-hiera-large", "bf16"),
    ("edgetam", "bf16"),
    ("ritm-h18", "fp32"),
)
BATCHED = ("sam-vit_h", "sam2.1-hiera-tiny", "edgetam")
WORKER_MODEL = "bench-sam-vit_b"

# The worker row's model, registered when a worker imports this module (``--plugin``).
register(
    ModelSpec(
        WORKER_MODEL,
        "backends.models.sam.loader:build",
        "bench: SAM ViT-B with random weights",
        extra="sam",
        kwargs=(("model_type", "vit_b"), ("random_weights", True)),
    )
)
register(
    ModelSpec(
        "bench-sam-tiny",
        "backends.models.sam.loader:build",
        "bench --quick: a tiny SAM with random weights",
        extra="sam",
        kwargs=(("random_weights", True), ("architecture", TINY_SAM)),
    )
)


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or ``--quick``."""

    frame: tuple[int, int]  # (height, width)
    encodes: int  # timed encodes per model (after one warm-up)
    clicks: int  # timed cached clicks per model
    batch: int
    models: tuple[tuple[str, str], ...]
    batched: tuple[str, ...]
    worker_model: str
    options: dict[str, dict[str, Any]]  # extra build options by model


def plan(device: str, quick: bool) -> Plan:
    if quick:
        tiny = {"architecture": TINY_SAM}
        return Plan(
            (240, 320), 1, 5, 2, (("sam-vit_b", "fp32"), ("ritm-h18s", "fp32")), ("sam-vit_b",),
            "bench-sam-tiny", {"sam-vit_b": tiny},
        )  # fmt: skip
    cuda = device.startswith("cuda")
    # bf16 autocast is CUDA only: a CPU runs every model once, in fp32 (its serving precision).
    models = MODELS if cuda else tuple(dict.fromkeys((name, "fp32") for name, _ in MODELS))
    return Plan(
        (1080, 1920),
        5 if cuda else 1,
        100 if cuda else 10,
        8 if cuda else 2,
        models,
        BATCHED,
        WORKER_MODEL,
        {},
    )


# --------------------------------------------------------------------------------------------
# Measuring


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A frame with objects (blocks of texture on a darker background), not pure noise."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
        h, w = rng.integers(height // 8, height // 3), rng.integers(width // 8, width // 3)
        frame[y : y + h, x : x + w] = rng.integers(120, 255, 3, dtype=np.uint8)
    return frame


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _allocated(device: str) -> float:
    import torch

    return float(torch.cuda.memory_allocated()) if device.startswith("cuda") else float("nan")


def _build(name: str, precision: str, device: str, options: dict[str, Any]) -> Any:
    import torch

    from backends.models import registry

    kwargs: dict[str, Any] = {"random_weights": True, "device": device, **options}
    if not name.startswith("ritm"):
        kwargs["autocast"] = precision == "bf16"
    if device.startswith("cuda"):
        # Built straight on the device, a ViT-H's random init takes a second instead of a
        # minute on the CPU; a module that cannot be built there is built on the CPU instead.
        try:
            with torch.device(device):
                return registry.create(name, **kwargs)
        except Exception as exc:
            _log(f"{name}: building on {device} failed ({exc}); building on the CPU")
    return registry.create(name, **kwargs)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _clicks(width: int, height: int, count: int, seed: int = 1) -> list[Prompt]:
    """Prompts of growing click lists, restarting every 8 clicks (an annotator's objects)."""
    rng = np.random.default_rng(seed)
    prompts, clicks = [], []
    for index in range(count + 1):  # the first one warms up
        if index % 8 == 0:
            clicks = []
        positive = len(clicks) == 0 or bool(rng.random() < 0.7)
        clicks.append(
            Click(float(rng.uniform(0, width - 1)), float(rng.uniform(0, height - 1)), positive)
        )
        prompts.append(Prompt(tuple(clicks)))
    return prompts


def measure_model(name: str, precision: str, device: str, p: Plan) -> ModelRow:
    """One model row: weights, encode, peak memory, embedding bytes, cached clicks."""
    import torch

    from backends.engine import Engine
    from backends.images import encode_png

    row = ModelRow(name, precision)
    if precision == "bf16" and not device.startswith("cuda"):
        row.note = "bf16 autocast is CUDA only"
        return row
    before = _allocated(device)
    segmenter = _build(name, precision, device, p.options.get(name, {}))
    _sync(device)
    row.weights_mib = (_allocated(device) - before) / MiB
    height, width = p.frame
    frame = _frame(height, width)
    if not name.startswith("ritm"):
        segmenter.encode(frame)  # warm-up (kernels, autotuning)
        times = []
        peak = float("nan")
        for _ in range(p.encodes):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start_mem = _allocated(device)
            _sync(device)
            started = time.perf_counter()
            embedding = segmenter.encode(frame)
            _sync(device)
            times.append(time.perf_counter() - started)
            if device.startswith("cuda"):
                peak = (torch.cuda.max_memory_allocated() - start_mem) / MiB
        row.encode_ms = statistics.median(times) * 1000
        row.encode_peak_mib = peak
        row.embedding_mib = float(embedding.nbytes) / MiB
        del embedding
    engine = Engine({name: segmenter})
    key = engine.put_image(encode_png(frame))
    prompts = _clicks(width, height, p.clicks)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    engine.segment(name, key, prompts[0])  # warm-up; encodes (cached from here on)
    timed = []
    for prompt in prompts[1:]:
        started = time.perf_counter()
        engine.segment(name, key, prompt)  # returns a numpy mask: the device is synchronised
        timed.append(time.perf_counter() - started)
    row.click_p50_ms = _percentile(timed, 50) * 1000
    row.click_p99_ms = _percentile(timed, 99) * 1000
    if name.startswith("ritm"):
        row.note = "per click (no separate encoder): zoom-in ROI + previous mask"
        if device.startswith("cuda"):
            row.encode_peak_mib = (torch.cuda.max_memory_allocated() - _allocated(device)) / MiB
    del engine, segmenter
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def measure_throughput(name: str, device: str, p: Plan) -> ThroughputRow:
    """Images per second: ``batch`` encodes one by one vs one ``encode_batch`` pass."""
    segmenter = _build(name, "bf16", device, p.options.get(name, {}))
    height, width = p.frame
    frames = [_frame(height, width, seed) for seed in range(p.batch)]
    # Warm-up at both shapes: a first pass at a new batch size autotunes its kernels.
    segmenter.encode_batch(frames)
    segmenter.encode(frames[0])
    _sync(device)
    started = time.perf_counter()
    singles = [segmenter.encode(frame) for frame in frames]
    _sync(device)
    one = time.perf_counter() - started
    started = time.perf_counter()
    together = segmenter.encode_batch(frames)
    _sync(device)
    batched = time.perf_counter() - started
    difference = max(
        float((a - b).abs().max())
        for single, joint in zip(singles, together, strict=True)
        for a, b in zip(single.tensors, joint.tensors, strict=True)
    )
    del segmenter, singles, together
    gc.collect()
    return ThroughputRow(name, p.batch, p.batch / one, p.batch / batched, difference)


# --------------------------------------------------------------------------------------------
# Running and printing


def environment(device: str) -> dict[str, str]:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = (
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f}"
        )
    return env


def _log(message: str) -> None:
    print(f"[bench-gpu] {message}", file=sys.stderr, flush=True)


def run(
    device: str, quick: bool = False, worker: bool = True, only: set[str] | None = None
) -> Report:
    import torch

    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # CPU: random weights must not measure denormal arithmetic
    p = plan(device, quick)
    if only:
        models = tuple(row for row in p.models if row[0] in only)
        p = dataclasses.replace(p, models=models, batched=tuple(n for n in p.batched if n in only))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = Report(device, when, environment(device), p.frame)
    for name, precision in p.models:
        _log(f"{name} {precision} …")
        try:
            report.models.append(measure_model(name, precision, device, p))
        except Exception as exc:  # one model failing must not lose the table
            report.models.append(
                ModelRow(name, precision, note=f"failed: {type(exc).__name__}: {exc}")
            )
            _log(f"{name} {precision} failed: {exc}")
    for name in p.batched:
        _log(f"{name} batched encodes …")
        try:
            report.throughput.append(measure_throughput(name, device, p))
        except Exception as exc:
            _log(f"{name} batched encodes failed: {exc}")
    if worker:
        from backends.benchmarks.gpu_serving import measure_worker

        _log("clicks through a worker …")
        try:
            row = measure_worker(device, p)
        except Exception as exc:
            row = WorkerRow(p.worker_model, *(float("nan"),) * 4, note=f"failed: {exc}")
        if row is not None:
            report.worker.append(row)
        else:
            _log("no redis-server here: the worker row is left out")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tapmask bench-gpu", description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny models, small frame (tests)")
    parser.add_argument("--no-worker", action="store_true", help="skip the Redis worker row")
    parser.add_argument("--only", help="comma-separated model names: measure only these")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument(
        "--check-oom", action="store_true", help="also cause a real CUDA out-of-memory (CUDA only)"
    )


def run_command(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("tapmask bench-gpu: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    only = {name.strip() for name in args.only.split(",") if name.strip()} if args.only else None
    report = run(args.device, quick=args.quick, worker=not args.no_worker, only=only)
    print(render(report))
    if args.check_oom:
        from backends.benchmarks.gpu_serving import check_out_of_memory

        print()
        print(check_out_of_memory(args.device))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(asdict(report), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
