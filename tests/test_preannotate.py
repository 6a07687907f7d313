"""Pre-annotation's tool-neutral pipeline (``backends.preannotate``) with a tiny random Grounding
DINO built and loaded through the real loading code, and GrabCut as the segmenter: in this
process and through a real Redis worker."""

from __future__ import annotations

import numpy as np
import pytest

from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.errors import (
    ModelLoadError,
    PromptError,
    TextPromptTooLong,
    TooManyInstances,
    TooManyTextPrompts,
    UnknownLabel,
)
from backends.models import hf, registry
from backends.models.detection import Detection, Detector, Thresholds
from backends.preannotate import (
    boxes_to_masks,
    label_prompts,
    parse_prompt_overrides,
    suppress_overlaps,
    text_to_masks,
)
from backends.prompts import Box
from backends.redis.dispatcher import RedisDispatcher
from backends.redis.preannotation import DetectJob
from backends.redis.protocol import DETECT_JOB, Keys
from tests.support.preannotate_models import tiny_detector_dir
from tests.support.processes import RedisServer, WorkerProcess

DETECTOR = "test-grounding-dino"
EVERYTHING = Thresholds(0.0, 0.0)  # random weights: keep every query


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return tiny_detector_dir(tmp_path_factory.mktemp("models") / "grounding-dino")


@pytest.fixture(scope="module")
def dispatcher(detector_dir):
    import tests.support.preannotate_models  # noqa: F401  (registers the test detector)

    engine = Engine()
    engine.load(["grabcut"])
    engine.load([DETECTOR], checkpoint=str(detector_dir))
    local = LocalDispatcher(engine)
    yield local
    local.close()


@pytest.fixture(scope="module")
def teddy(grabcut_dir) -> bytes:
    return (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()


def test_grounding_dino_loads_through_the_registry_name_and_checks_its_size(detector_dir):
    detector = hf.build_detector(
        "grounding-dino-tiny", checkpoint=detector_dir, device="cpu", check_variant=False
    )
    assert isinstance(detector, Detector)
    assert registry.spec("grounding-dino-tiny").kind == "detector"
    assert "grounding-dino-base" in registry.names("detector")
    assert "grounding-dino-tiny" not in registry.names("segmenter")
    with pytest.raises(ModelLoadError, match="another size"):  # tiny Swin is not Swin-T
        hf.build_detector("grounding-dino-tiny", checkpoint=detector_dir, device="cpu")


def test_tapmask_weights_fetches_grounding_dino_with_its_tokenizer(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("TAPMASK_MODELS_DIR", str(tmp_path))
    seen: dict = {}

    def fake_snapshot(**kwargs):
        seen.update(kwargs)
        target = Path(kwargs["local_dir"])
        (target / "config.json").write_text('{"model_type": "grounding-dino"}')
        (target / "model.safetensors").write_bytes(b"weights")
        return str(target)

    path = hf.download("grounding-dino-base", snapshot_download=fake_snapshot)
    assert path == tmp_path / "grounding-dino-base"
    assert seen["repo_id"] == "IDEA-Research/grounding-dino-base"
    assert {"vocab.txt", "tokenizer.json", "model.safetensors"} <= set(seen["allow_patterns"])
    assert not any(p.endswith((".bin", ".pth", ".pt")) for p in seen["allow_patterns"])


def test_a_detector_directory_without_its_tokenizer_is_refused(detector_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((detector_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="tokenizer"):
        hf.build_detector("grounding-dino-tiny", checkpoint=tmp_path, check_variant=False)


def test_detections_name_their_phrase_and_lie_inside_the_image(dispatcher, teddy):
    found = dispatcher.detect(DETECTOR, teddy, ["object", "car"], EVERYTHING)
    assert len(found) == 12  # every query of the tiny model at threshold 0
    assert {d.prompt_index for d in found} <= {0, 1}
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    for d in found:
        assert 0 <= d.box.x1 <= d.box.x2 <= 283 and 0 <= d.box.y1 <= d.box.y2 <= 397
    assert dispatcher.detect(DETECTOR, teddy, ["object"], Thresholds(1.0, 1.0)) == []


def test_text_to_masks_labels_each_mask_and_scores_detector_times_mask(dispatcher, teddy):
    prompts = {"Object": "object . thing", "Car": ""}  # "" → the label's own name
    instances = text_to_masks(dispatcher, "grabcut", DETECTOR, teddy, prompts, EVERYTHING)
    assert instances and {i.label for i in instances} <= {"Object", "Car"}
    assert [i.score for i in instances] == sorted((i.score for i in instances), reverse=True)
    for instance in instances:
        assert instance.mask.shape == (398, 284) and instance.mask.any()
        assert 0.0 <= instance.score <= 1.0
        rows, cols = np.nonzero(instance.mask)  # GrabCut keeps its mask inside the box
        box = instance.box
        assert cols.min() >= box.x1 - 1 and cols.max() <= box.x2 + 1
        assert rows.min() >= box.y1 - 1 and rows.max() <= box.y2 + 1


def test_overlapping_boxes_of_one_label_become_one_instance():
    box = Box(10, 10, 50, 50)
    found = [
        Detection(0, box, 0.9),
        Detection(1, Box(11, 11, 51, 51), 0.8),  # same label (phrase 1 is also "Car")
        Detection(2, Box(12, 12, 52, 52), 0.7),  # another label: kept
    ]
    kept = suppress_overlaps(found, ["Car", "Car", "Person"])
    assert [d.score for d in kept] == [0.9, 0.7]


def test_boxes_to_masks_on_a_ground_truth_box_beats_the_filled_box(dispatcher, grabcut_dir):
    import cv2

    from backends import masks
    from backends.evaluation.clicker import ground_truth_from_label, iou

    image = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    gt = ground_truth_from_label(cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp")))
    x1, y1, x2, y2 = masks.mask_bbox(gt)
    (instance,) = boxes_to_masks(dispatcher, "grabcut", image, [("Teddy", Box(x1, y1, x2, y2))])
    filled = np.zeros_like(gt)
    filled[y1 : y2 + 1, x1 : x2 + 1] = True
    assert instance.label == "Teddy" and 0 < instance.score <= 1
    assert iou(gt, instance.mask) > iou(gt, filled) + 0.1


def test_every_grabcut_image_gets_a_mask_from_its_box_better_than_the_box(dispatcher, grabcut_dir):
    """The figure README quotes (``tapmask eval-boxes``): GrabCut, weights-free, on all 50."""
    from backends.evaluation.boxes import evaluate_boxes

    scores = evaluate_boxes(grabcut_dir, dispatcher, "grabcut")
    assert len(scores) == 50 and all(s.has_mask for s in scores)
    mean_mask = np.mean([s.mask_iou for s in scores])
    mean_box = np.mean([s.box_iou for s in scores])
    assert mean_mask > mean_box + 0.2  # measured: 0.859 against 0.546


def test_bounds_refuse_before_any_work(dispatcher, teddy, monkeypatch):
    monkeypatch.setenv("TAPMASK_MAX_INSTANCES", "2")
    with pytest.raises(TooManyInstances, match="TAPMASK_MAX_INSTANCES"):
        boxes_to_masks(dispatcher, "grabcut", teddy, [("A", Box(1, 1, 9, 9))] * 3)
    kept = text_to_masks(dispatcher, "grabcut", DETECTOR, teddy, {"Object": ""}, EVERYTHING)
    assert 1 <= len(kept) <= 2  # detections over the bound: the best ones kept
    monkeypatch.setenv("TAPMASK_MAX_TEXT_PROMPTS", "2")
    with pytest.raises(TooManyTextPrompts, match="TAPMASK_MAX_TEXT_PROMPTS"):
        text_to_masks(dispatcher, "grabcut", DETECTOR, teddy, {"A": "a . b . c"})
    monkeypatch.setenv("TAPMASK_MAX_TEXT_PROMPT_CHARS", "10")
    with pytest.raises(TextPromptTooLong, match="TAPMASK_MAX_TEXT_PROMPT_CHARS"):
        dispatcher.detect(DETECTOR, teddy, ["a very long phrase"])
    with pytest.raises(PromptError, match="threshold"):
        Thresholds(1.5, 0.2)


def test_label_prompts_default_to_the_label_and_take_overrides(monkeypatch):
    monkeypatch.setenv("TAPMASK_LABEL_PROMPTS", '{"Person": "person . pedestrian"}')
    overrides = parse_prompt_overrides(["Car=car . truck"])
    assert label_prompts(["Car", "Person", "Tree"], overrides) == {
        "Car": "car . truck",
        "Person": "person . pedestrian",
        "Tree": "Tree",
    }
    with pytest.raises(UnknownLabel, match="Cat"):
        label_prompts(["Car"], {"Cat": "cat"})


# --------------------------------------------------------------------------------------------
# Through the shared worker pool


@pytest.fixture(scope="module")
def redis_worker(detector_dir, tmp_path_factory):
    with RedisServer() as server:
        worker = WorkerProcess(
            server.url,
            ["grabcut", DETECTOR],
            name="preannotate",
            plugins=["tests.support.preannotate_models"],
            env={"TAPMASK_TEST_DETECTOR_DIR": str(detector_dir)},
            log_dir=str(tmp_path_factory.mktemp("w")),
        )
        try:
            connection = server.client()
            worker.wait_ready(connection, timeout=120)
            yield server, connection
        finally:
            worker.stop(timeout=5)


def test_text_to_masks_through_a_worker_equals_in_process(redis_worker, dispatcher, teddy):
    server, connection = redis_worker
    remote = RedisDispatcher(server.url, ["grabcut", DETECTOR])
    try:
        prompts = {"Object": "object", "Car": "car"}
        here = text_to_masks(dispatcher, "grabcut", DETECTOR, teddy, prompts, EVERYTHING)
        there = text_to_masks(remote, "grabcut", DETECTOR, teddy, prompts, EVERYTHING)
        assert [(i.label, round(i.score, 4)) for i in there] == [
            (i.label, round(i.score, 4)) for i in here
        ]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(here, there, strict=True))
        # A hostile job (too many phrases) is refused by the worker, which keeps serving.
        payload = DetectJob(DETECTOR, "0" * 64, ("a",) * 500).to_payload()
        from rq import Queue
        from rq.serializers import JSONSerializer

        queue = Queue(Keys().batch(DETECTOR), connection=connection, serializer=JSONSerializer)
        job = queue.enqueue_call(DETECT_JOB, args=(payload,), timeout=10)
        result = job.latest_result(timeout=30)
        assert result.return_value["error"] == "too_many_text_prompts"
        assert remote.detect(DETECTOR, teddy, ["object"], EVERYTHING)
    finally:
        remote.close()
