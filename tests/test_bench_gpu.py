"""``tapmask bench-gpu`` runs here on the CPU (``--quick``: the same code on tiny models), so the
command the GPU runs is tested; its real figures come from ``make bench-gpu``."""

from __future__ import annotations

import json
import math

from backends.cli import main


def test_bench_gpu_prints_every_section_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-gpu", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| model | precision |" in table
    assert "| encode throughput |" in table
    assert "through Redis" in table or "Redis + worker" in table
    report = json.loads(out.read_text())
    sam = next(r for r in report["models"] if r["model"] == "sam-vit_b")
    assert sam["encode_ms"] > 0 and sam["embedding_mib"] > 0
    assert 0 < sam["click_p50_ms"] <= sam["click_p99_ms"]
    ritm = next(r for r in report["models"] if r["model"].startswith("ritm"))
    assert ritm["click_p50_ms"] > 0 and math.isnan(ritm["encode_ms"])
    (batched,) = report["throughput"]
    assert batched["one_by_one_per_s"] > 0 and batched["batched_per_s"] > 0
    (worker,) = report["worker"]
    assert worker["worker_p50_ms"] > 0 and worker["in_process_p50_ms"] > 0


def test_bench_gpu_refuses_cuda_where_there_is_none(capsys):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - a GPU machine
        return
    assert main(["bench-gpu", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
