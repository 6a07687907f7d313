"""transformers families vs segment-anything SAM ViT-B: image encode, cached click, cache bytes.

One run measures, side by side on the CPU at 1920×1080: SAM ViT-B through segment-anything (the
baseline, ``backends.models.sam.loader.build(model_type="vit_b", random_weights=True)``) and one
model per transformers family, all real-size architectures with *random* weights (timings depend
on the architecture, not the weights; no checkpoint download):

* ``sam-hf-vit-b`` / ``sam-hq-vit-b``: segment-anything's ViT-B sizes (``sizes.SAM_VIT_SIZES``);
* ``sam2.1-hiera-tiny``: ``Sam2Config()``'s defaults, which are the official Hiera-T config;
* ``edgetam``: ``EdgeTamConfig`` with the RepViT-M1 backbone spelled out (``EDGETAM_BACKBONE``:
  transformers 5.23's default misspells it and would build a ResNet-50), the official EdgeTAM.

transformers initialises SAM's ViT with std 1e-10, so weights are redrawn with std 0.02 (before
EdgeTAM's backbone is fused, as serving fuses the loaded weights), and denormal floats are flushed
to zero for the run: random weights can shrink activations into that range, where CPUs slow down
up to ~100x, which would measure the random numbers rather than the architecture.

The machine's load drifts (other work shares the CPUs), so SAM ViT-B stays loaded for the whole
run: its image encode is timed first and last (the baseline is their mean), and every model's
cached clicks alternate with SAM ViT-B's (10 each, medians). Image encode: once for the ViT
models (tens of seconds on a small CPU), median of 3 for the small encoders. Cached click: a
second click decoded against the cached embedding and the first click's state. Targets: EdgeTAM
encodes >= 8x faster than SAM ViT-B, and its cached click costs at most 2x SAM ViT-B's.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from backends.benchmarks import BenchRow
from backends.benchmarks.sam import _image
from backends.prompts import Click, Prompt

ENCODE_TARGET = 8.0  # edgetam encode >= 8x faster than SAM ViT-B
CLICK_TARGET = 2.0  # edgetam cached click <= 2x SAM ViT-B's
MODELS = ("sam-hf-vit-b", "sam-hq-vit-b", "sam2.1-hiera-tiny", "edgetam")
SMALL_ENCODERS = ("sam2.1-hiera-tiny", "edgetam")
MiB = float(1 << 20)


def _redraw(model: Any) -> None:
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)


class _Subject:
    """A segmenter with one image encoded and a first click decoded, ready for second clicks."""

    def __init__(self, segmenter: Any, image: Any, repeat: int) -> None:
        height, width = image.shape[:2]
        first = Prompt((Click(width * 0.5, height * 0.5),))
        self.second = Prompt((*first.clicks, Click(width * 0.3, height * 0.3, positive=False)))
        self.segmenter, self.image = segmenter, image
        self.encode_times = [self.encode() for _ in range(repeat)]
        _, self.state = segmenter.decode(image, self.embedding, first, None)
        self.click()  # warm-up
        self.nbytes = float(self.embedding.nbytes)

    def encode(self) -> float:
        start = time.perf_counter()
        self.embedding = self.segmenter.encode(self.image)
        return time.perf_counter() - start

    def click(self) -> float:
        start = time.perf_counter()
        self.segmenter.decode(self.image, self.embedding, self.second, self.state)
        return time.perf_counter() - start


def _interleaved_clicks(a: _Subject, b: _Subject, repeat: int = 10) -> tuple[float, float]:
    """Median second-click times of ``a`` and ``b``, measured alternately (same machine load)."""
    times_a, times_b = [], []
    for _ in range(repeat):
        times_a.append(a.click())
        times_b.append(b.click())
    return statistics.median(times_a), statistics.median(times_b)


def _log(message: str) -> None:
    print(f"[hf] {message}", file=sys.stderr, flush=True)


def _unfused(name: str) -> dict[str, Any]:
    return {"fuse_backbone": False} if name == "edgetam" else {}


def run(models: tuple[str, ...] = MODELS) -> list[BenchRow]:
    import torch

    # Random weights can drive activations into float32's denormal range, which CPUs process up
    # to ~100x slower; trained weights do not. Flush them to zero for the whole run.
    torch.set_flush_denormal(True)
    try:
        return _run(models)
    finally:
        torch.set_flush_denormal(False)


def _run(models: tuple[str, ...]) -> list[BenchRow]:
    import torch

    from backends.errors import ModelLoadError
    from backends.models import hf
    from backends.models.sam.loader import build as build_sam

    torch.manual_seed(0)
    image = _image()

    _log("SAM ViT-B (segment-anything) …")
    sam = _Subject(
        build_sam("sam-vit_b", model_type="vit_b", random_weights=True, device="cpu"), image, 1
    )
    _log(f"SAM ViT-B encode {sam.encode_times[0]:.2f}s")

    measured: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    for name in models:
        _log(f"{name} …")
        try:
            segmenter = hf.build(name, random_weights=True, device="cpu", **_unfused(name))
        except ModelLoadError as exc:
            _log(f"{name} not measured: {exc}")
            failures[name] = str(exc)
            continue
        _redraw(segmenter.model)
        if name == "edgetam":  # fuse after the redraw, as serving fuses the loaded weights
            from backends.models.hf.families import optimize_edgetam

            segmenter.backbone.channels_last = optimize_edgetam(segmenter.model)
        repeat = 3 if name in SMALL_ENCODERS else 1
        subject = _Subject(segmenter, image, repeat)
        sam_click, click = _interleaved_clicks(sam, subject)
        measured[name] = {
            "encode": statistics.median(subject.encode_times),
            "repeat": float(repeat),
            "click": click,
            "sam_click": sam_click,
            "bytes": subject.nbytes,
        }
        del subject, segmenter
        gc.collect()
        _log(f"{name} encode {measured[name]['encode']:.2f}s, click {click * 1000:.1f}ms")

    sam.encode_times.append(sam.encode())  # bracket: the machine's load drifts during the run
    sam_encode = statistics.mean(sam.encode_times)
    _log(f"SAM ViT-B encode again {sam.encode_times[-1]:.2f}s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    context = (
        f"random weights, {torch.get_num_threads()} torch threads, load {load:.1f} on "
        f"{os.cpu_count()} CPUs; SAM ViT-B encode = mean of "
        + " and ".join(f"{t:.1f}s" for t in sam.encode_times)
        + " (first and last of the run)"
    )
    rows: list[BenchRow] = []
    for name in models:
        if name in failures:
            rows.extend(_unmeasured(name, sam_encode, failures[name]))
        elif name in measured:
            rows.extend(_rows(name, measured[name], sam_encode, sam.nbytes, context))
    return rows


def _targets(name: str) -> tuple[str, Callable[[float], bool] | None, str, Callable | None]:
    if name != "edgetam":
        return "", None, "", None
    return (
        f">= {ENCODE_TARGET:g}x faster",
        lambda ratio: ratio >= ENCODE_TARGET,
        f"<= {CLICK_TARGET:g}x SAM's time",
        lambda ratio: ratio >= 1.0 / CLICK_TARGET,
    )


def _rows(
    name: str, result: dict[str, float], sam_encode: float, sam_bytes: float, context: str
) -> list[BenchRow]:
    encode_target, encode_ok, click_target, click_ok = _targets(name)
    encode_ratio = sam_encode / result["encode"]
    click_ratio = result["sam_click"] / result["click"]
    repeat = int(result["repeat"])
    how = "once" if repeat == 1 else f"median of {repeat}"
    return [
        BenchRow(
            name=f"{name}: image encode vs SAM ViT-B (1920×1080, CPU)",
            ours=result["encode"],
            baseline=sam_encode,
            target=encode_target,
            passed=encode_ok(encode_ratio) if encode_ok else None,
            note=f"{name} encode {how}; {context}",
        ),
        BenchRow(
            name=f"{name}: cached click vs SAM ViT-B",
            ours=result["click"],
            baseline=result["sam_click"],
            target=click_target,
            passed=click_ok(click_ratio) if click_ok else None,
            note="second click on the cached embedding + state; 10 each, alternating; medians",
        ),
        BenchRow(
            name=f"{name}: cached embedding size vs SAM ViT-B",
            ours=result["bytes"] / MiB,
            baseline=sam_bytes / MiB,
            unit="MiB",
        ),
    ]


def _unmeasured(name: str, sam_encode: float, reason: str) -> list[BenchRow]:
    """The rows of a model that could not be built: its targets count as missed."""
    nan = float("nan")
    result = {"encode": nan, "click": nan, "sam_click": nan, "repeat": 1.0, "bytes": nan}
    return _rows(name, result, sam_encode, nan, f"not measured: {reason}")
