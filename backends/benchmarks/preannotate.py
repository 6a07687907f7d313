"""Pre-annotation rows: images/s of the two pipelines, 2 workers vs 1, and Label Studio's API cost.

* text → masks (``backends.preannotate.text_to_masks``) with Grounding DINO tiny and EdgeTAM, both
  real-size architectures with random weights on the CPU (timings depend on the architecture, not
  the weights), 3 masks per image (``TAPMASK_MAX_INSTANCES=3``, thresholds 0), against the
  detector alone: what the masks add;
* boxes → masks (``boxes_to_masks``), 3 boxes per image, EdgeTAM against GrabCut (weights-free);
* boxes → masks with GrabCut through Redis (``batch`` queue), 2 workers against 1, 4 images in
  flight, other images in each run (a worker's Engine caches answers); it needs two free cores:
  on a shared machine the ratio shows how many were free;
* Label Studio's API per task as ``tapmask annotate`` calls it (read the task, download its image,
  post a prediction of 3 brush regions, then delete it), against GrabCut's boxes → masks of the
  same task: the share of a task's time spent talking to Label Studio. It starts a real Label
  Studio 1.23.2 (about 35 s; skipped when ``.venv-labelstudio`` is missing).

Images: 640×480 synthetic photos (``benchmarks.sam._image``). Denormal floats are flushed to zero
for the run (random weights can shrink activations into that range, where CPUs slow down).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from backends import images
from backends.benchmarks import BenchRow
from backends.benchmarks.sam import _image
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.models.detection import Thresholds
from backends.preannotate import boxes_to_masks, text_to_masks
from backends.prompts import Box

WIDTH, HEIGHT = 640, 480
EVERYTHING = Thresholds(0.0, 0.0)
BOXES = [
    ("object", Box(40, 60, 300, 400)),
    ("object", Box(320, 40, 600, 300)),
    ("object", Box(200, 200, 520, 460)),
]


def _images(count: int, seed: int = 10) -> list[bytes]:
    return [images.encode_png(_image(HEIGHT, WIDTH, seed + i)) for i in range(count)]


def _rate(fn: Callable[[bytes], object], frames: list[bytes]) -> float:
    started = time.perf_counter()
    for frame in frames:
        fn(frame)
    return len(frames) / (time.perf_counter() - started)


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pipelines() -> list[BenchRow]:
    import torch

    torch.set_flush_denormal(True)
    engine = Engine()
    engine.load(["grabcut"])
    engine.load(["edgetam", "grounding-dino-tiny"], random_weights=True, device="cpu")
    local = LocalDispatcher(engine)
    frames = _images(1)  # a real-size Grounding DINO takes seconds per image on a CPU
    prompts = {"object": "object . thing"}
    detector = "grounding-dino-tiny"
    try:
        with _env(TAPMASK_MAX_INSTANCES="3"):
            local.detect(detector, _images(1, 99)[0], ["warm"], EVERYTHING)  # warm-ups
            boxes_to_masks(local, "edgetam", _images(1, 98)[0], BOXES[:1])
            phrases = ["object", "thing"]
            detect = _rate(lambda f: local.detect(detector, f, phrases, EVERYTHING), frames)
            text = _rate(
                lambda f: text_to_masks(local, "edgetam", detector, f, prompts, EVERYTHING), frames
            )
        boxes_sam = _rate(lambda f: boxes_to_masks(local, "edgetam", f, BOXES), _images(4, 20))
        boxes_grabcut = _rate(lambda f: boxes_to_masks(local, "grabcut", f, BOXES), _images(4, 30))
    finally:
        local.close()
    return [
        BenchRow(
            "preannotate: text → masks images/s, GD-tiny+EdgeTAM vs detector",
            text,
            detect,
            unit="img/s",
            higher_is_better=True,
            note=f"CPU, random weights, {WIDTH}x{HEIGHT}, 3 masks per image; detector alone "
            f"{1 / detect:.1f} s per image",
        ),
        BenchRow(
            "preannotate: boxes → masks images/s, EdgeTAM vs GrabCut",
            boxes_sam,
            boxes_grabcut,
            unit="img/s",
            higher_is_better=True,
            note=f"CPU, 3 boxes per {WIDTH}x{HEIGHT} image, each image encoded once",
        ),
    ]


def _workers() -> list[BenchRow]:
    from backends.benchmarks.redis_procs import RedisServer, WorkerProcess
    from backends.redis.dispatcher import RedisDispatcher

    rates: dict[int, float] = {}
    with RedisServer() as server, tempfile.TemporaryDirectory() as logs:
        connection = server.client()
        remote = RedisDispatcher(server.url, ["grabcut"], job_timeout=120)
        workers: list[WorkerProcess] = []
        try:
            for count in (1, 2):
                name = f"bench-pre-{count}"
                workers.append(WorkerProcess(server.url, ["grabcut"], name=name, log_dir=logs))
                workers[-1].wait_ready(connection)
                # New images for each run: a worker's Engine has the last run's answers cached.
                frames = _images(12, 40 + 20 * count)
                boxes_to_masks(remote, "grabcut", _images(1, 99)[0], BOXES[:1])  # warm-up
                started = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda f: boxes_to_masks(remote, "grabcut", f, BOXES), frames))
                rates[count] = len(frames) / (time.perf_counter() - started)
        finally:
            remote.close()
            for worker in workers:
                worker.stop()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return [
        BenchRow(
            "preannotate: boxes → masks images/s via Redis, 2 workers vs 1",
            rates[2],
            rates[1],
            unit="img/s",
            higher_is_better=True,
            note=f"GrabCut, 3 boxes per image, batch queue; {os.cpu_count()} cores, "
            f"load {load:.1f}",
        )
    ]


def _label_studio() -> list[BenchRow]:
    from backends.benchmarks.labelstudio_proc import LS_BIN, TOKEN, label_studio_server
    from backends.labelstudio.api import LabelStudioApi
    from backends.labelstudio.labelconfig import LabelConfig
    from backends.labelstudio.preannotation import Preannotation, instance_regions

    if not LS_BIN.exists():
        print(f"[preannotate] Label Studio row skipped: {LS_BIN} missing", file=sys.stderr)
        return []
    config_xml = (
        '<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
        '<Label value="object"/></BrushLabels></View>'
    )
    frames = _images(6, 50)
    engine = Engine()
    engine.load(["grabcut"])
    local = LocalDispatcher(engine)
    api_times, compute_times = [], []
    with tempfile.TemporaryDirectory() as data, label_studio_server(Path(data)) as ls:
        project = ls.api(
            "POST", "/api/projects", json={"title": "bench", "label_config": config_xml}
        ).json()["id"]
        for i, frame in enumerate(frames):
            files = {"file": (f"bench{i}.png", frame, "image/png")}
            ls.api("POST", f"/api/projects/{project}/import", files=files)
        config = LabelConfig.parse(config_xml)
        plan = Preannotation("boxes", "grabcut")
        with LabelStudioApi(ls.url, TOKEN) as api:
            for listed in api.tasks(project):
                started = time.perf_counter()
                task = api.task(int(listed["id"]))
                frame = api.image(task["data"]["image"])
                fetched = time.perf_counter()
                instances = boxes_to_masks(local, "grabcut", frame, BOXES)
                computed = time.perf_counter()
                regions = instance_regions(plan, config, task["id"], "image", instances)
                posted = api.post_prediction(task["id"], regions, 0.5, "bench")
                api.delete_prediction(int(posted["id"]))
                api_times.append(fetched - started + time.perf_counter() - computed)
                compute_times.append(computed - fetched)
    local.close()
    api_s, compute_s = statistics.median(api_times), statistics.median(compute_times)
    return [
        BenchRow(
            "preannotate: Label Studio API per task vs GrabCut boxes → masks",
            api_s,
            compute_s,
            note=f"read task + download {WIDTH}x{HEIGHT} PNG + post 3 brush regions + delete: "
            f"{api_s / (api_s + compute_s):.0%} of a task's time (median of {len(api_times)})",
        )
    ]


def run() -> list[BenchRow]:
    return [*_pipelines(), *_workers(), *_label_studio()]
