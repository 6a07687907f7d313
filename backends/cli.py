"""``tapmask`` command line: segment, serve, worker, eval, bench, weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backends.errors import TapmaskError
from backends.evaluation.arguments import add_eval_arguments
from backends.redis.pool import add_pool_arguments, add_worker_arguments
from backends.settings import model_name


def _parse_click(text: str):
    from backends.prompts import Click

    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"click {text!r}: expected x,y or x,y,+ or x,y,-")
    sign = parts[2].strip() if len(parts) == 3 else "+"
    if sign not in ("+", "-", "1", "0"):
        raise argparse.ArgumentTypeError(f"click {text!r}: the third field must be + or -")
    try:
        return Click(float(parts[0]), float(parts[1]), sign in ("+", "1"))
    except (ValueError, TapmaskError) as exc:
        raise argparse.ArgumentTypeError(f"click {text!r}: {exc}") from exc


def _parse_box(text: str):
    from backends.prompts import Box

    try:
        return Box(*(float(v) for v in text.split(",")))
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected x1,y1,x2,y2 ({exc})") from exc


def _cmd_segment(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from backends import masks
    from backends.engine import Engine
    from backends.prompts import Prompt

    data = Path(args.image).read_bytes()
    engine = Engine()
    options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    engine.load([args.model], **options)
    result = engine.segment(args.model, data, Prompt(tuple(args.click or ()), args.box))
    out = Path(args.out)
    if out.suffix.lower() == ".json":
        polygons = masks.mask_to_polygons(result.mask, tolerance=args.tolerance)
        payload = {
            "model": result.model,
            "score": result.score,
            "width": result.width,
            "height": result.height,
            "polygons": [p.points.tolist() for p in polygons],
        }
        out.write_text(json.dumps(payload))
    else:
        if not cv2.imwrite(str(out), result.mask.astype(np.uint8) * 255):
            raise SystemExit(f"cannot write {out}")
    print(
        f"{result.model}: {result.area} px ({result.area / result.mask.size:.1%}), "
        f"score {result.score:.3f} -> {out}"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backends.dispatch import dispatcher_from_env
    from backends.labelstudio.app import Settings, create_app
    from backends.preannotate.settings import detector_name
    from backends.redis.startup import load_plugins

    load_plugins(args.plugin or [])
    # "Retrieve predictions" in text mode needs the detector served too (README); video
    # regions need the tracker. All load before serving.
    detector = args.detector or (
        detector_name() if os.environ.get("TAPMASK_RETRIEVE") == "text" else None
    )
    models = list(dict.fromkeys([args.model, args.tracker] + ([detector] if detector else [])))
    checkpoints = {args.model: args.checkpoint, str(detector): args.detector_checkpoint}
    options = {"device": args.device} if args.device else {}
    dispatcher = dispatcher_from_env(models, checkpoints, **options)
    settings = Settings(model=args.model, tracker=args.tracker)
    if detector:
        settings.detector = detector
    app = create_app(dispatcher, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    dispatcher.close()
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    from backends.labelstudio.prefetch import prefetch_project

    return prefetch_project(args.project, args.backend, args.label_studio, args.batch)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from backends.labelstudio.annotate import annotate_project
    from backends.labelstudio.preannotation import FORMATS, Preannotation
    from backends.models.detection import Thresholds
    from backends.preannotate import parse_prompt_overrides, thresholds_from_env
    from backends.preannotate.settings import detector_name
    from backends.redis.startup import load_plugins

    load_plugins(args.plugin or [])
    defaults = thresholds_from_env()
    plan = Preannotation(
        mode=args.mode,
        model=args.model,
        detector=(args.detector or detector_name()) if args.mode == "text" else None,
        prompts=parse_prompt_overrides(args.prompt or []),
        thresholds=Thresholds(
            defaults.box if args.box_threshold is None else args.box_threshold,
            defaults.text if args.text_threshold is None else args.text_threshold,
        ),
        formats=FORMATS[args.format],
    )
    models = [plan.model] + ([plan.detector] if plan.detector else [])
    checkpoints = {plan.model: args.checkpoint, str(plan.detector): args.detector_checkpoint}
    return _run_on_project(
        args,
        models,
        checkpoints,
        lambda api, dispatcher: annotate_project(
            api,
            dispatcher,
            plan,
            args.project,
            task_ids=args.tasks,
            force=args.force,
            concurrency=args.concurrency,
        ),
    )


def _cmd_track(args: argparse.Namespace) -> int:
    from backends.labelstudio.track import track_project

    return _run_on_project(
        args,
        [args.tracker],
        {args.tracker: args.checkpoint},
        lambda api, dispatcher: track_project(
            api,
            dispatcher,
            args.project,
            tracker=args.tracker,
            seconds=args.seconds,
            task_ids=args.tasks,
            force=args.force,
            concurrency=args.concurrency,
        ),
    )


def _run_on_project(
    args: argparse.Namespace,
    models: list[str],
    checkpoints: dict[str, str | None],
    run: Callable[[Any, Any], Any],
) -> int:
    """A whole-project command: a dispatcher for ``models``, the Label Studio API, the summary."""
    from backends.dispatch import dispatcher_from_env
    from backends.labelstudio.api import LabelStudioApi

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    options = {"device": args.device} if args.device else {}
    dispatcher = dispatcher_from_env(models, checkpoints, **options)
    try:
        with LabelStudioApi(args.label_studio, args.token) as api:
            summary = run(api, dispatcher)
    finally:
        dispatcher.close()
    print(summary.report())
    return int(summary.exit_code)


def _task_ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tasks {text!r}: expected ids like 1,2,3") from exc


def _cmd_eval(args: argparse.Namespace) -> int:
    from backends.evaluation.run import main as eval_main

    return eval_main(args)


def _cmd_eval_boxes(args: argparse.Namespace) -> int:
    from backends.evaluation.boxes import main as boxes_main

    return boxes_main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from backends.benchmarks.run import main as bench_main

    return bench_main(args.only)


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from backends.benchmarks.gpu import run_command

    return run_command(args)


def _cmd_weights(args: argparse.Namespace) -> int:
    from backends import weights
    from backends.models import hf

    if args.convert:
        print(hf.convert_sam_checkpoint(*args.convert))
        return 0
    if not args.names:
        print("tapmask weights: name a model (tapmask models) or use --convert", file=sys.stderr)
        return 2
    for name in args.names:
        if name in hf.MODELS or name in hf.DETECTORS:
            print(hf.download(name, Path(args.dest) / name if args.dest else None))
        else:
            print(weights.download(name, Path(args.dest) if args.dest else None))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from backends.models import registry

    for name in registry.names():
        spec = registry.spec(name)
        extra = f"  [tapmask[{spec.extra}]]" if spec.extra else ""
        print(f"{name:16} {spec.description}{extra}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from backends.redis.startup import run_worker

    return run_worker(args)


def _cmd_workers(args: argparse.Namespace) -> int:
    from backends.redis.pool import print_pool

    return print_pool(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapmask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment one image from the command line")
    seg.add_argument("image")
    seg.add_argument("--click", action="append", type=_parse_click, metavar="X,Y[,+|-]")
    seg.add_argument("--box", type=_parse_box, metavar="X1,Y1,X2,Y2")
    seg.add_argument("--model", default=model_name())
    seg.add_argument("--checkpoint")
    seg.add_argument("--out", required=True, help="mask.png (0/255) or polygons.json")
    seg.add_argument("--tolerance", type=float, default=1.0, help="polygon simplification, px")
    seg.set_defaults(func=_cmd_segment)

    ev = sub.add_parser("eval", help="NoC evaluation on GrabCut/Berkeley/DAVIS folders")
    add_eval_arguments(ev)
    ev.set_defaults(func=_cmd_eval)

    ev_boxes = sub.add_parser(
        "eval-boxes", help="boxes → masks: each ground truth's tight box through the model"
    )
    ev_boxes.add_argument("--dataset", required=True)
    ev_boxes.add_argument("--model", default="grabcut")
    ev_boxes.add_argument("--checkpoint")
    ev_boxes.add_argument("--limit", type=int, help="only the first N images")
    ev_boxes.set_defaults(func=_cmd_eval_boxes)

    bench = sub.add_parser("bench", help="side-by-side performance measurements")
    bench.add_argument("--only", action="append", help="run only these bench modules")
    bench.set_defaults(func=_cmd_bench)

    bench_gpu = sub.add_parser(
        "bench-gpu", help="encode/click latency, memory and batching on one device (a table)"
    )
    from backends.benchmarks.gpu import add_arguments as add_bench_gpu_arguments

    add_bench_gpu_arguments(bench_gpu)
    bench_gpu.set_defaults(func=_cmd_bench_gpu)

    weights = sub.add_parser("weights", help="download official checkpoints (needs internet)")
    weights.add_argument("names", nargs="*")
    weights.add_argument(
        "--convert",
        nargs=2,
        metavar=("SRC_PTH", "DEST_DIR"),
        help="convert a segment-anything .pth into a Hugging Face directory (sam-hf-*)",
    )
    weights.add_argument("--dest")
    weights.set_defaults(func=_cmd_weights)

    models = sub.add_parser("models", help="list the model names")
    models.set_defaults(func=_cmd_models)

    serve = sub.add_parser("serve", help="serve a front end (labelstudio)")
    serve.add_argument("frontend", choices=["labelstudio"])
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    serve.add_argument("--model", default=model_name())
    serve.add_argument("--checkpoint", help="model checkpoint (default: the model's env/dir)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    serve.add_argument(
        "--tracker",
        default=os.environ.get("TAPMASK_TRACKER") or "flow",
        help="video tracker for Label Studio video regions (default: $TAPMASK_TRACKER or flow)",
    )
    serve.add_argument("--detector", help="also serve this detector (Retrieve predictions, text)")
    serve.add_argument("--detector-checkpoint", help="the detector's model directory")
    serve.add_argument("--plugin", action="append", help="module registering extra models")
    serve.set_defaults(func=_cmd_serve)

    prefetch = sub.add_parser(
        "prefetch", help="compute embeddings for every task of a Label Studio project"
    )
    prefetch.add_argument("--project", type=int, required=True)
    prefetch.add_argument("--backend", default="http://localhost:9090", help="tapmask backend")
    prefetch.add_argument("--label-studio", default=os.environ.get("LABEL_STUDIO_URL"))
    prefetch.add_argument("--batch", type=int, default=20, help="tasks per /predict call")
    prefetch.set_defaults(func=_cmd_prefetch)

    annotate = sub.add_parser(
        "annotate", help="pre-annotate a whole Label Studio project (predictions with masks)"
    )
    annotate.add_argument("--project", type=int, required=True)
    annotate.add_argument("--mode", choices=["text", "boxes"], required=True)
    annotate.add_argument("--tasks", type=_task_ids, help="only these task ids: 1,2,3")
    annotate.add_argument("--model", default=model_name(), help="the segmenter")
    annotate.add_argument(
        "--detector", help="text mode's detector (default: TAPMASK_DETECTOR, grounding-dino-tiny)"
    )
    annotate.add_argument(
        "--prompt", action="append", metavar="LABEL=TEXT", help="a label's prompt: Car=car . truck"
    )
    annotate.add_argument("--box-threshold", type=float)
    annotate.add_argument("--text-threshold", type=float)
    annotate.add_argument("--format", choices=["brush", "polygon", "both"], default="brush")
    annotate.add_argument("--force", action="store_true", help="redo tasks already annotated")
    annotate.add_argument("--concurrency", type=int, default=4, help="tasks in flight")
    annotate.add_argument("--label-studio", default=os.environ.get("LABEL_STUDIO_URL"))
    annotate.add_argument("--token", help="default: LABEL_STUDIO_API_KEY (never logged)")
    annotate.add_argument("--checkpoint", help="the segmenter's checkpoint")
    annotate.add_argument("--detector-checkpoint", help="the detector's model directory")
    annotate.add_argument("--device", help="cpu, cuda … (in-process models only)")
    annotate.add_argument("--plugin", action="append", help="module registering extra models")
    annotate.set_defaults(func=_cmd_annotate)

    track = sub.add_parser(
        "track",
        help="track every keyframed video region of a Label Studio project (predictions)",
    )
    track.add_argument("--project", type=int, required=True)
    track.add_argument("--tasks", type=_task_ids, help="only these task ids: 1,2,3")
    track.add_argument(
        "--tracker",
        default=os.environ.get("TAPMASK_TRACKER") or "flow",
        help="video tracker (default: $TAPMASK_TRACKER or flow)",
    )
    track.add_argument(
        "--seconds",
        type=float,
        help="video tracked after each keyframe (default: to the end, TAPMASK_MAX_TRACK_FRAMES)",
    )
    track.add_argument("--force", action="store_true", help="track tasks already tracked again")
    track.add_argument("--concurrency", type=int, default=2, help="tasks in flight")
    track.add_argument("--label-studio", default=os.environ.get("LABEL_STUDIO_URL"))
    track.add_argument("--token", help="default: LABEL_STUDIO_API_KEY (never logged)")
    track.add_argument("--checkpoint", help="the tracker's checkpoint (model directory)")
    track.add_argument("--device", help="cpu, cuda … (in-process trackers only)")
    track.set_defaults(func=_cmd_track)

    worker = sub.add_parser("worker", help="a Redis/rq worker serving the shared queues")
    add_worker_arguments(worker)
    worker.set_defaults(func=_cmd_worker)

    workers = sub.add_parser("workers", help="list live workers, their models and queue depths")
    add_pool_arguments(workers)
    workers.set_defaults(func=_cmd_workers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except TapmaskError as exc:
        print(f"tapmask: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
