"""``tapmask eval``: NoC evaluation of one or more models, with CSV curves and a PNG plot.

Each model runs in the progressive modes asked for (``--progressive``): ``both`` (the default)
runs it plain and progressive on the same images, side by side in the table and the plot.
A sample that cannot be read or whose clicks fail is reported (table, CSV ``error`` column) and
left out of the figures; the run goes on.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from backends.engine import Engine
from backends.evaluation.datasets import iter_samples
from backends.evaluation.noc import SampleResult, evaluate_sample, summarise

#: ``--progressive`` choices → the modes to run (None: the model's own setting).
MODES: dict[str, tuple[bool | None, ...]] = {
    "both": (False, True),
    "on": (True,),
    "off": (False,),
    "default": (None,),
}


@dataclass
class Run:
    model: str
    progressive: bool
    results: list[SampleResult]

    @property
    def mode(self) -> str:
        return "progressive" if self.progressive else "plain"

    @property
    def label(self) -> str:
        return f"{self.model} ({self.mode})"


def evaluate_model(
    engine: Engine, model: str, dataset: Path, max_clicks: int, limit: int | None = None
) -> list[SampleResult]:
    samples = list(iter_samples(dataset, limit))
    mode = "progressive" if engine.progressive(model) else "plain"
    results = []
    for sample in tqdm(samples, desc=f"{model} {mode}", unit="img"):
        if sample.error is not None:
            results.append(SampleResult(sample.name, error=sample.error))
            continue
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


def write_csv(path: Path, run: Run, max_clicks: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["model", "progressive", "image", "error"]
        writer.writerow([*header, *[f"iou_{k + 1}" for k in range(max_clicks)]])
        for result in run.results:
            writer.writerow(
                [
                    run.model,
                    "on" if run.progressive else "off",
                    result.name,
                    result.error or "",
                    *[f"{v:.5f}" for v in result.ious],
                ]
            )


def write_plot(path: Path, runs: list[Run], max_clicks: int, title: str = "") -> None:
    """Mean IoU per click: one colour per model, solid progressive, dashed plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    clicks = np.arange(1, max_clicks + 1)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r.model for r in runs))}
    for run in runs:
        done = [r for r in run.results if r.error is None and r.ious]
        if not done:
            continue
        ious = np.array([r.ious + [r.ious[-1]] * (max_clicks - len(r.ious)) for r in done])
        ax.plot(
            clicks,
            ious.mean(axis=0),
            color=colours[run.model],
            linestyle="-" if run.progressive else "--",
            marker="o" if run.progressive else "x",
            markersize=3,
            label=run.label,
        )
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_xlim(1, max_clicks)
    ax.set_xticks(clicks[:: max(1, max_clicks // 10)])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _format(key: str, value: float) -> str:
    if key.startswith(">=") or key == "failed":
        return f"{value:9.0f}"
    if key == "collapse%":
        return f"{value:9.2f}"
    return f"{value:9.3f}"


def print_table(runs: list[Run], max_clicks: int) -> None:
    summaries = [summarise(run.results, max_clicks) for run in runs]
    header = list(summaries[0])
    print(f"{'model':16} {'progressive':>11} " + " ".join(f"{h:>9}" for h in header))
    for run, summary in zip(runs, summaries, strict=True):
        values = " ".join(_format(h, summary[h]) for h in header)
        print(f"{run.model:16} {'on' if run.progressive else 'off':>11} {values}")
    for run in runs:
        for result in run.results:
            if result.error is not None:
                print(f"failed: {run.label} {result.name}: {result.error}")


def _engine(model: str, args: argparse.Namespace) -> Engine:
    engine = Engine()
    options: dict[str, object] = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if getattr(args, "tiny_random", False):
        from backends.models.sizes import TINY_SAM

        options.update(random_weights=True, seed=0, architecture=TINY_SAM, device="cpu")
    engine.load([model], **options)
    return engine


def refine_main(args: argparse.Namespace) -> int:
    """``--refine-from``: pre-annotation + one corrective click vs one click from scratch."""
    from backends.evaluation.refine import evaluate_refine, print_refine_table, summarise_refine

    samples = list(iter_samples(Path(args.dataset), args.limit))
    rows = []
    for model in args.model:
        engine = _engine(model, args)
        for mode in args.refine_from:
            rows.append(
                (model, mode, summarise_refine(evaluate_refine(engine, model, samples, mode)))
            )
    print_refine_table(rows)
    return 0 if all(summary["images"] for *_, summary in rows) else 1


def main(args: argparse.Namespace) -> int:
    if getattr(args, "refine_from", None):
        return refine_main(args)
    dataset = Path(args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for model in args.model:
        engine = _engine(model, args)
        for mode in MODES[args.progressive]:
            if mode is not None:
                engine.config.progressive[model] = mode
            results = evaluate_model(engine, model, dataset, args.max_clicks, args.limit)
            run = Run(model, engine.progressive(model), results)
            runs.append(run)
            csv_path = out / f"{model}_{run.mode}_{dataset.name}_ious.csv"
            write_csv(csv_path, run, args.max_clicks)
    print_table(runs, args.max_clicks)
    plot = out / f"{dataset.name}_miou.png"
    write_plot(plot, runs, args.max_clicks, f"{dataset.name}, {args.max_clicks} clicks")
    print(f"curves: {out}/*_ious.csv, plot: {plot}")
    measured = all(any(r.error is None for r in run.results) for run in runs)
    return 0 if measured else 1
