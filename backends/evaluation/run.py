"""``tapmask eval``: NoC evaluation of one or more models, with CSV curves and a PNG plot."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tqdm import tqdm

from backends.engine import Engine
from backends.evaluation.datasets import load_samples
from backends.evaluation.noc import SampleResult, evaluate_sample, summarise


def evaluate_model(
    engine: Engine, model: str, dataset: Path, max_clicks: int, limit: int | None = None
) -> list[SampleResult]:
    samples = list(load_samples(dataset, limit))
    results = []
    for sample in tqdm(samples, desc=model, unit="img"):
        results.append(
            evaluate_sample(
                lambda data, prompt: engine.segment(model, data, prompt),
                sample.name,
                sample.image_bytes,
                sample.gt,
                max_clicks=max_clicks,
            )
        )
        # Free this image's caches: evaluation never comes back to an image.
        engine.images.clear()
        engine.embeddings.clear()
        engine.states.clear()
    return results


def write_csv(path: Path, model: str, results: list[SampleResult], max_clicks: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "image", *[f"iou_{k + 1}" for k in range(max_clicks)]])
        for result in results:
            writer.writerow([model, result.name, *[f"{v:.5f}" for v in result.ious]])


def write_plot(path: Path, curves: dict[str, list[SampleResult]], max_clicks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    clicks = np.arange(1, max_clicks + 1)
    for model, results in curves.items():
        ious = np.array([r.ious + [r.ious[-1]] * (max_clicks - len(r.ious)) for r in results])
        ax.plot(clicks, ious.mean(axis=0), marker="o", markersize=3, label=model)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_xlim(1, max_clicks)
    ax.set_xticks(clicks[:: max(1, max_clicks // 10)])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    dataset = Path(args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[SampleResult]] = {}
    rows = []
    for model in args.model:
        engine = Engine()
        options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
        engine.load([model], **options)
        results = evaluate_model(engine, model, dataset, args.max_clicks, args.limit)
        curves[model] = results
        write_csv(out / f"{model}_{dataset.name}_ious.csv", model, results, args.max_clicks)
        rows.append((model, summarise(results, args.max_clicks)))
    header = list(rows[0][1])
    print(f"{'model':16} " + " ".join(f"{h:>9}" for h in header))
    for model, summary in rows:
        values = " ".join(
            f"{summary[h]:9.0f}" if h.startswith(">=") else f"{summary[h]:9.3f}" for h in header
        )
        print(f"{model:16} {values}")
    plot = out / f"{dataset.name}_miou.png"
    write_plot(plot, curves, args.max_clicks)
    print(f"curves: {out}/*_ious.csv, plot: {plot}")
    return 0
