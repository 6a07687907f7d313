"""Video tracking rows: frames/s per object at 1080p on the CPU, state bytes, RSS over a long clip.

One run, side by side, on a synthetic 1920×1080 clip from the GrabCut benchmark images
(``backends.video.synthetic``; ``TAPMASK_BENCH_DATASET``, default ``../shared/datasets/GrabCut``
next to the repository):

* per tracker, frames/s for one object: the tracker's ``step`` (state carried) against what
  users hand-roll today, re-initialising the image model from a box on every frame (encode +
  box decode): ``flow`` vs GrabCut, ``sam2.1-hiera-tiny-video`` vs ``sam2.1-hiera-tiny``,
  ``edgetam-video`` vs ``edgetam``; the timed frames alternate between the two (same load);
* memory per tracked object: the state's bytes in the shared tier (fp16) after the memory window
  is full, against one frame's cached image embedding (the baseline's per-frame state);
* RSS over a long clip (``TAPMASK_BENCH_VIDEO_FRAMES``, default 1,000) tracked with the flow
  tracker through the tracking service (handles, state cache bounded at 64 MiB here), measured
  first: RSS is printed at the start, middle and end; the row is the growth from the middle to
  the end (the state cache fills to its bound in the first ~380 frames: 170 KB a state).

The transformers models are real-size architectures with random weights (timings depend on the
architecture): the same redraw and denormal flush as the ``hf`` rows. ``TAPMASK_BENCH_VIDEO_STEPS``
(default 4) frames are timed per video model: each costs seconds on a small CPU.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backends.benchmarks import BenchRow
from backends.masks import mask_bbox
from backends.prompts import Box, Prompt, TrackTarget

WIDTH, HEIGHT = 1920, 1080
MiB = float(1 << 20)
PAIRS = (
    ("flow", "grabcut"),
    ("edgetam-video", "edgetam"),
    ("sam2.1-hiera-tiny-video", "sam2.1-hiera-tiny"),
)
RSS_GROWTH_TARGET_MIB = 32.0


def _log(message: str) -> None:
    print(f"[video] {message}", file=sys.stderr, flush=True)


def _dataset() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "GrabCut"
    return Path(os.environ.get("TAPMASK_BENCH_DATASET", default))


def _rss_mib() -> float:
    """Current resident set size (Linux ``/proc``; else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(name: str) -> Any:
    from backends.models import registry

    options: dict[str, Any] = {}
    if name != "flow" and name != "grabcut":
        options = {"random_weights": True, "device": "cpu"}
    model = registry.create(name, **options)
    inner = getattr(model, "model", None)
    if inner is not None:
        from backends.benchmarks.hf import _redraw

        _redraw(inner)
    return model


class _Pair:
    """A tracker and the image model it replaces, both warmed up on the clip's first frame."""

    def __init__(self, tracker: Any, image_model: Any, clip: Any) -> None:
        self.tracker, self.image_model, self.clip = tracker, image_model, clip
        frame, truth = clip.frame(0)
        self.box = Box(*mask_bbox(truth[0]))
        _, self.state = tracker.start(frame, TrackTarget(box=self.box))
        self.embedding_bytes = 0.0

    def step(self, index: int) -> float:
        frame, _ = self.clip.frame(index)
        start = time.perf_counter()
        _, self.state = self.tracker.step(frame, self.state)
        return time.perf_counter() - start

    def reinit(self, index: int) -> float:
        frame, truth = self.clip.frame(index)
        bbox = mask_bbox(truth[0]) or (0, 0, 10, 10)
        start = time.perf_counter()
        embedding = self.image_model.encode(frame)
        self.image_model.decode(frame, embedding, Prompt(box=Box(*bbox)), None)
        elapsed = time.perf_counter() - start
        self.embedding_bytes = float(getattr(embedding, "nbytes", 0) or 0)
        return elapsed


def run() -> list[BenchRow]:
    import torch

    torch.set_flush_denormal(True)
    try:
        return _run()
    finally:
        torch.set_flush_denormal(False)


def _run() -> list[BenchRow]:
    import torch

    from backends.video.synthetic import build_clip

    dataset = _dataset()
    if not (dataset / "data_GT").is_dir():
        raise FileNotFoundError(f"{dataset}: GrabCut dataset not found (TAPMASK_BENCH_DATASET)")
    steps = int(os.environ.get("TAPMASK_BENCH_VIDEO_STEPS", 4))
    long_frames = int(os.environ.get("TAPMASK_BENCH_VIDEO_FRAMES", 1000))
    torch.manual_seed(0)
    clip = build_clip(dataset, objects=1, frames=max(long_frames, 60), width=WIDTH, height=HEIGHT)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    context = f"{torch.get_num_threads()} torch threads, load {load:.1f} on {os.cpu_count()} CPUs"
    # RSS first, before any transformers model has been loaded and freed: memory those leave in
    # the allocator's pools would hide the state cache filling up.
    rows: list[BenchRow] = [_rss_row(clip, long_frames)]
    for tracker_name, image_name in PAIRS:
        _log(f"{tracker_name} vs {image_name} …")
        try:
            pair = _Pair(_build(tracker_name), _build(image_name), clip)
        except Exception as exc:  # a missing extra (timm…) skips the row, not the run
            _log(f"{tracker_name} not measured: {exc}")
            continue
        count = 20 if tracker_name == "flow" else steps
        pair.step(1)  # warm-up (first-call allocations)
        pair.reinit(1)
        ours, baseline = [], []
        for index in range(2, 2 + count):
            ours.append(pair.step(index))
            baseline.append(pair.reinit(index))
        # Fill the memory-feature window so the state has its steady-state size (frames past
        # it add an object pointer each: a few hundred bytes).
        window = getattr(pair.tracker, "memory_frames", 0) + 1
        for index in range(2 + count, 3 + max(count, window)):
            pair.step(index)
        state_bytes = float(len(pair.tracker.state_to_bytes(pair.state)))
        fps, base_fps = 1.0 / statistics.median(ours), 1.0 / statistics.median(baseline)
        _log(f"{tracker_name}: {fps:.2f} frames/s vs {base_fps:.2f}; state {state_bytes:.0f} B")
        rows.append(
            BenchRow(
                name=f"{tracker_name}: frames/s, 1 object, 1080p CPU vs {image_name} per frame",
                ours=fps,
                baseline=base_fps,
                unit="fps",
                higher_is_better=True,
                note=f"median of {count} frames each, alternating; {context}",
            )
        )
        rows.append(
            BenchRow(
                name=f"{tracker_name}: state per object (shared, fp16) vs 1 embedding",
                ours=state_bytes / MiB,
                baseline=pair.embedding_bytes / MiB,
                unit="MiB",
                show_ratio=bool(pair.embedding_bytes),
                note="state after the memory window is full; baseline: the image model's "
                "cached embedding of one frame (GrabCut has none)",
            )
        )
        del pair
        gc.collect()
    return rows


def _rss_row(clip: Any, frames: int) -> BenchRow:
    from backends.models import registry
    from backends.tracking import TrackingService

    tracker = registry.create("flow")
    service = TrackingService(64 << 20)
    frame, truth = clip.frame(0)
    targets = [TrackTarget(box=Box(*mask_bbox(truth[0])))]
    marks: dict[str, float] = {"start": _rss_mib()}
    started = time.perf_counter()
    for index in range(frames):
        frame, _ = clip.frame(index)
        answers = service.track("flow", tracker, frame, targets)
        targets = [TrackTarget(box=targets[0].box, state=answers[0].state)]
        if index == frames // 2:
            marks["middle"] = _rss_mib()
    marks["end"] = _rss_mib()
    seconds = time.perf_counter() - started
    text = ", ".join(f"{k} {v:.0f} MiB" for k, v in marks.items())
    _log(f"flow RSS over {frames} frames: {text} ({frames / seconds:.1f} frames/s)")
    growth = marks["end"] - marks["middle"]
    return BenchRow(
        name=f"flow: RSS growth, frame {frames // 2} to {frames} (1080p, 1 object)",
        ours=growth,
        baseline=marks["end"] - marks["start"],
        unit="MiB",
        show_ratio=False,
        target=f"< {RSS_GROWTH_TARGET_MIB:g} MiB",
        passed=growth < RSS_GROWTH_TARGET_MIB,
        note=f"RSS {text}; baseline column: growth from the start (state cache fills to its "
        f"64 MiB bound); {frames / seconds:.1f} frames/s including rendering the clip",
    )


if __name__ == "__main__":  # python -m backends.benchmarks.video (``tapmask bench --only video``)
    from backends.benchmarks.run import main

    raise SystemExit(main(["video"]))
