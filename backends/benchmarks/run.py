"""``tapmask bench``: run every bench module and print one table of side-by-side ratios."""

from __future__ import annotations

import importlib
import sys
import traceback

from backends.benchmarks import BenchRow

MODULES = ["codecs", "sam", "ritm", "queue", "hf", "preannotate"]


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:10.2f} ms" if value < 10 else f"{value:10.2f} s "
    return f"{value:10.3g} {unit}"


def main(only: list[str] | None = None) -> int:
    rows: list[BenchRow] = []
    failed = False
    for name in only or MODULES:
        try:
            module = importlib.import_module(f"backends.benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
            continue
        print(f"[{name}] running…", file=sys.stderr, flush=True)
        try:
            rows.extend(module.run())
        except Exception:
            failed = True
            traceback.print_exc()
    print()
    print(f"{'benchmark':58} {'tapmask':>13} {'baseline':>13} {'ratio':>9}  target")
    for row in rows:
        verdict = "" if row.passed is None else ("  ok" if row.passed else "  MISSED")
        print(
            f"{row.name:58} {_fmt(row.ours, row.unit)} {_fmt(row.baseline, row.unit)} "
            f"{f'{row.ratio:8.1f}x' if row.show_ratio else '       -'}  {row.target}{verdict}"
        )
        if row.note:
            print(f"{'':60}{row.note}")
    return 1 if failed else 0
