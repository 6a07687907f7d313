"""The rows ``tapmask bench-gpu`` measures, and the Markdown table it prints (for the README)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelRow:
    model: str
    precision: str
    weights_mib: float = float("nan")
    encode_ms: float = float("nan")
    encode_peak_mib: float = float("nan")
    embedding_mib: float = float("nan")
    click_p50_ms: float = float("nan")
    click_p99_ms: float = float("nan")
    note: str = ""


@dataclass
class ThroughputRow:
    model: str
    batch: int
    one_by_one_per_s: float
    batched_per_s: float
    max_difference: float  # largest |batched - one by one| over the embedding values


@dataclass
class WorkerRow:
    model: str
    in_process_p50_ms: float
    in_process_p99_ms: float
    worker_p50_ms: float
    worker_p99_ms: float
    note: str = ""


@dataclass
class Report:
    device: str
    when: str
    environment: dict[str, str]
    frame: tuple[int, int] = (1080, 1920)
    models: list[ModelRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)
    worker: list[WorkerRow] = field(default_factory=list)


def _num(value: float, digits: int = 1) -> str:
    return "–" if value != value else f"{value:,.{digits}f}"


def render(report: Report) -> str:
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    lines = [
        f"Device `{report.device}` ({env}), {report.when}; random weights, "
        f"{report.frame[1]}×{report.frame[0]} frame.",
        "",
        "| model | precision | weights MiB | encode ms | encode peak MiB | embedding MiB "
        "| cached click p50 ms | p99 ms | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report.models:
        lines.append(
            f"| `{r.model}` | {r.precision} | {_num(r.weights_mib)} | {_num(r.encode_ms)} | "
            f"{_num(r.encode_peak_mib)} | {_num(r.embedding_mib, 2)} | {_num(r.click_p50_ms)} | "
            f"{_num(r.click_p99_ms)} | {r.note} |"
        )
    if report.throughput:
        lines += [
            "",
            "| encode throughput | batch | one by one img/s | batched img/s | gain "
            "| max abs difference |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for t in report.throughput:
            gain = t.batched_per_s / t.one_by_one_per_s if t.one_by_one_per_s else float("nan")
            lines.append(
                f"| `{t.model}` | {t.batch} | {_num(t.one_by_one_per_s, 2)} | "
                f"{_num(t.batched_per_s, 2)} | {_num(gain, 2)}× | {t.max_difference:.2g} |"
            )
    for w in report.worker:
        lines += [
            "",
            "| cached click | in-process p50 ms | p99 ms | Redis + worker p50 ms | p99 ms |",
            "|---|--:|--:|--:|--:|",
            f"| `{w.model}` ({w.note}) | {_num(w.in_process_p50_ms)} | "
            f"{_num(w.in_process_p99_ms)} | {_num(w.worker_p50_ms)} | {_num(w.worker_p99_ms)} |",
        ]
    return "\n".join(lines)
