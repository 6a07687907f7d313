"""The ``tapmask eval`` options (kept out of ``backends.cli`` with the parsing they need)."""

from __future__ import annotations

import argparse


def _refine_mode(text: str) -> str:
    from backends.evaluation.refine import parse_mode

    try:
        parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--checkpoint")
    parser.add_argument("--out", default="eval-results", help="folder for CSV and PNG")
    parser.add_argument(
        "--progressive",
        choices=["both", "on", "off", "default"],
        default="both",
        help="progressive (local) corrections: both side by side (default), on, off, or the "
        "model's serving setting (TAPMASK_PROGRESSIVE, else the model's default)",
    )
    parser.add_argument(
        "--refine-from",
        action="append",
        type=_refine_mode,
        metavar="dilateN|erodeN",
        help="instead of NoC: ground truth dilated/eroded by N px + one corrective click vs one "
        "click from scratch, mean IoU (repeatable)",
    )
    parser.add_argument(
        "--tiny-random",
        action="store_true",
        help="SAM models with tiny random weights (sizes.TINY_SAM): the code path, not quality",
    )
