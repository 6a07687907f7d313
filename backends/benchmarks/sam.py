"""SAM: a follow-up click (decode with the cached embedding and state) vs a first click.

Uses a real-size ViT-B with *random* weights on the CPU, so it needs no checkpoint download: the
timings depend on the architecture, not on the weights. First click = ``encode`` + first
``decode`` (measured once: the encode alone takes tens of seconds on a small CPU box); second
click = ``decode`` with the first click's state, median of 10.
"""

from __future__ import annotations

import os
import time

import numpy as np

from backends.benchmarks import BenchRow, median_time
from backends.prompts import Click, Prompt

TARGET_RATIO = 50.0


def _image(height: int = 1080, width: int = 1920, seed: int = 0) -> np.ndarray:
    """A random-ish photo stand-in: smooth gradients, a few flat shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [120 + 80 * np.sin(xs / 300), 100 + 60 * np.cos(ys / 200), 90 + 0.05 * (xs - ys)], axis=2
    )
    for _ in range(6):
        x, y = int(rng.integers(0, width - 300)), int(rng.integers(0, height - 300))
        w, h = (int(v) for v in rng.integers(100, 300, size=2))
        image[y : y + h, x : x + w] = rng.integers(0, 255, size=3)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def run() -> list[BenchRow]:
    import torch

    from backends.models.sam.loader import build

    torch.manual_seed(0)
    segmenter = build("sam-vit_b", model_type="vit_b", random_weights=True, device="cpu")
    image = _image()
    height, width = image.shape[:2]
    first = Prompt((Click(width * 0.5, height * 0.5),))
    second = Prompt((*first.clicks, Click(width * 0.3, height * 0.3, positive=False)))

    start = time.perf_counter()
    embedding = segmenter.encode(image)
    encoded = time.perf_counter()
    _, state = segmenter.decode(image, embedding, first, None)
    first_click = time.perf_counter() - start
    first_decode = first_click - (encoded - start)

    second_click = median_time(
        lambda: segmenter.decode(image, embedding, second, state), repeat=10, warmup=1
    )
    ratio = first_click / second_click
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        BenchRow(
            name="sam vit_b: second click vs first click (1920×1080, CPU)",
            ours=second_click,
            baseline=first_click,
            unit="s",
            target=f">= {TARGET_RATIO:g}x faster",
            passed=ratio >= TARGET_RATIO,
            note=(
                f"random weights, {torch.get_num_threads()} torch threads, load average "
                f"{load:.1f} on {os.cpu_count()} CPUs; first click = encode "
                f"{encoded - start:.2f}s + decode {first_decode:.3f}s (once); second click = "
                "decode with cached embedding + state (median of 10)"
            ),
        )
    ]


if __name__ == "__main__":
    for row in run():
        print(
            f"{row.name}: ours {row.ours:.4f}{row.unit}, baseline {row.baseline:.3f}{row.unit}, "
            f"{row.ratio:.1f}x (target {row.target}: {'pass' if row.passed else 'FAIL'})"
        )
        print(f"  {row.note}")
