"""The Redis/rq path with a real redis-server and real worker processes.

One private ``redis-server`` per module (a free loopback port, no persistence; the restart test
stops and starts it on the same port). Worker processes are ``tapmask worker`` with
``--plugin tests.support.queue_models``, which registers small reporting test models (see that
module); each model name is served only by the workers of the test that uses it, so tests do
not steal each other's jobs. Every process a test starts is stopped in its fixture.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import pytest
from rq import Queue
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from backends import images
from backends.dispatch import LocalDispatcher, dispatcher_from_env
from backends.engine import Engine
from backends.errors import (
    EmptyMask,
    ImageError,
    ImageTooLarge,
    ModelNotFound,
    PromptError,
    TapmaskError,
    Timeout,
    Unavailable,
    UnknownImage,
)
from backends.prompts import Click, Prompt
from backends.redis import protocol
from backends.redis.dispatcher import RedisDispatcher
from backends.redis.embeddings import RedisEmbeddingStore
from backends.redis.pool import print_pool
from backends.redis.protocol import SEGMENT_JOB, Keys, error_from_reply, error_reply
from tests.conftest import TINY_SAM
from tests.support.processes import RedisServer, WorkerProcess

PLUGIN = "tests.support.queue_models"


def _png(seed: int, width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    return images.encode_png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def rconn(server):
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def spawn(server, tmp_path):
    """Start worker processes; all of them are stopped (warm, then killed) after the test."""
    started: list[WorkerProcess] = []

    def start(name: str, models: list[str], env: dict | None = None, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(
            server.url,
            models,
            name=name,
            plugins=[PLUGIN],
            env={"TAPMASK_TEST_REDIS_URL": server.url, **(env or {})},
            log_dir=str(tmp_path),
            **kwargs,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=5)


@pytest.fixture
def make_dispatcher(server):
    made: list[RedisDispatcher] = []

    def make(**kwargs) -> RedisDispatcher:
        kwargs.setdefault("queue_ttl", 3)
        kwargs.setdefault("job_timeout", 10)
        kwargs.setdefault("grace", 1)
        dispatcher = RedisDispatcher(server.url, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


def _count(rconn, what: str, model: str) -> int:
    return int(rconn.get(f"test:{what}:{model}") or 0)


def _wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def _presence(rconn, name: str) -> dict | None:
    raw = rconn.get(Keys().presence(name))
    return json.loads(raw) if raw else None


# -- in-process pieces (no worker process) ------------------------------------------------------


def test_error_payloads_come_back_as_the_same_error():
    for exc in (
        ImageError("bad"),
        ImageTooLarge("big"),
        PromptError("p"),
        ModelNotFound("m"),
        UnknownImage("u"),
        EmptyMask("e"),
        Unavailable("x"),
        Timeout("t"),
    ):
        back = error_from_reply(json.loads(json.dumps(error_reply(exc))))
        assert type(back) is type(exc) and back.status == exc.status and str(back) == str(exc)
    odd = error_from_reply({"ok": False, "error": "teapot", "status": 418, "detail": "no"})
    assert isinstance(odd, TapmaskError) and odd.status == 418 and odd.code == "teapot"


def test_dispatcher_from_env_switches_on_the_redis_url(monkeypatch):
    monkeypatch.delenv("TAPMASK_REDIS_URL", raising=False)
    local = dispatcher_from_env(["grabcut"])
    assert isinstance(local, LocalDispatcher)
    local.close()
    monkeypatch.setenv("TAPMASK_REDIS_URL", "redis://127.0.0.1:1/0")
    remote = dispatcher_from_env(["grabcut"], device="cpu")  # no connection made yet
    assert isinstance(remote, RedisDispatcher) and remote.models() == ["grabcut"]
    with pytest.raises(ModelNotFound):
        remote.segment("sam-vit_h", _png(0), Prompt((Click(1, 1),)))
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:  # nothing listens on port 1: a fast, clear 503
        remote.segment("grabcut", _png(0), Prompt((Click(1, 1),)))
    assert info.value.status == 503 and time.monotonic() - started < 3
    remote.close()


def test_shared_embedding_store_is_bounded(rconn):
    keys = Keys("bounded")
    store = RedisEmbeddingStore(rconn, keys, ttl=60, max_bytes=3000, max_entry_bytes=1500)
    for i in range(4):
        store.put("m", f"{i:064x}", bytes([i]) * 1000)
    assert store.total_bytes() <= 3000
    assert store.get("m", f"{0:064x}") is None  # the oldest went first
    assert store.get("m", f"{3:064x}") == bytes([3]) * 1000
    store.put("m", "f" * 64, b"x" * 2000)  # over the per-entry cap: not shared
    assert store.get("m", "f" * 64) is None
    assert 0 < rconn.ttl(keys.embedding("m", f"{3:064x}")) <= 60


def test_sam_embedding_is_shared_between_engines_in_fp16(tiny_sam_checkpoint, rconn):
    """A second Engine (another worker) decodes from the shared tier without encoding."""
    store = RedisEmbeddingStore(rconn, Keys("samshare"), ttl=60)
    options = {"checkpoint": tiny_sam_checkpoint, "device": "cpu", "architecture": TINY_SAM}
    first, second = Engine(shared_embeddings=store), Engine(shared_embeddings=store)
    first.load(["sam"], **options)
    second.load(["sam"], **options)
    image = _png(7, 320, 240)
    clicks = (Click(100, 100), Click(200, 50, False))
    expected = first.segment("sam", image, Prompt(clicks))
    got = second.segment("sam", image, Prompt(clicks))
    assert first.model("sam").encode_calls == 1 and second.model("sam").encode_calls == 0
    assert second.stats.shared_hits == 1 and second.stats.encodes == 0
    assert (got.mask == expected.mask).mean() > 0.99  # fp16 features: same masks, to rounding
    data = store.get("sam", images.sha256(image))
    assert data is not None and len(data) < first.embeddings.bytes  # fp16: half the float32


# -- worker processes ---------------------------------------------------------------------------


def test_both_front_ends_share_one_worker(spawn, make_dispatcher, rconn, server, capsys):
    worker = spawn("shared-one", ["test-counting"])
    worker.wait_ready(rconn)
    label_studio = make_dispatcher(models=["test-counting"])
    cvat = make_dispatcher()
    image = _png(1)
    label_studio.prefetch("test-counting", image)  # task open: batch queue, no wait
    _wait_for(lambda: _count(rconn, "encodes", "test-counting") == 1)

    sets: list[str] = []
    real_set = cvat.redis.set
    cvat.redis.set = lambda key, *a, **k: (sets.append(key), real_set(key, *a, **k))[1]
    first = cvat.segment("test-counting", image, Prompt((Click(5, 5),)))
    assert first.mask[5, 5] and first.mask.sum() == 1 and first.score == pytest.approx(0.51)
    assert first.extra["worker"] == "shared-one"
    assert sets == []  # the image was already in Redis: CVAT's dispatcher sent only its key
    second = label_studio.segment("test-counting", image, Prompt((Click(5, 5), Click(9, 9))))
    assert second.mask.sum() == 2 and second.model == "test-counting"
    embedding = cvat.export_embedding("test-counting", image)
    assert embedding.shape == (1, 10, 10, 10) and embedding.dtype == np.float32
    assert np.allclose(embedding, images.decode(image).mean(), rtol=1e-3)
    assert _count(rconn, "encodes", "test-counting") == 1  # one encode for everything above
    assert len(list(rconn.scan_iter("tapmask:img:*"))) == 1

    with pytest.raises(ModelNotFound):
        label_studio.segment("grabcut", image, Prompt((Click(5, 5),)))
    args = argparse.Namespace(redis_url=server.url, namespace="tapmask", json=True)
    assert print_pool(args) == 0
    listing = json.loads(capsys.readouterr().out)
    (info,) = [w for w in listing["workers"] if w["name"] == "shared-one"]
    assert info["models"] == ["test-counting"] and info["pid"] == worker.pid
    assert listing["queues"]["test-counting"] == {"interactive": 0, "batch": 0}


def test_follow_up_click_on_another_worker_reuses_the_shared_embedding(
    spawn, make_dispatcher, rconn
):
    dispatcher = make_dispatcher()
    image = _png(2)
    first_worker = spawn("first", ["test-shared"]).wait_ready(rconn)
    first = dispatcher.segment("test-shared", image, Prompt((Click(3, 3),)))
    assert first.extra["worker"] == "first"
    first_worker.terminate()  # warm shutdown: exits cleanly and deregisters
    assert first_worker.wait(15) == 0 and _presence(rconn, "first") is None

    spawn("second", ["test-shared"]).wait_ready(rconn)
    follow_up = dispatcher.segment("test-shared", image, Prompt((Click(3, 3), Click(8, 8))))
    assert follow_up.extra["worker"] == "second" and follow_up.mask.sum() == 2
    assert _count(rconn, "encodes", "test-shared") == 1  # no re-encode on the other worker
    stats = _wait_for(
        lambda: (_presence(rconn, "second") or {}).get("stats", {}).get("shared_hits")
    )
    assert stats == 1


def test_interactive_jobs_overtake_queued_batch_jobs(spawn, make_dispatcher, rconn):
    worker = spawn("prio", ["test-slow"]).wait_ready(rconn)
    dispatcher = make_dispatcher()
    for seed in range(10, 14):  # four 0.4 s prefetches queue up on the batch queue
        dispatcher.prefetch("test-slow", _png(seed))
    _wait_for(lambda: _count(rconn, "encode-start", "test-slow") >= 1)
    started = time.monotonic()
    result = dispatcher.segment("test-slow", _png(20), Prompt((Click(1, 1),)))
    elapsed = time.monotonic() - started
    batch_left = rconn.llen(Keys.queue_list(Keys().batch("test-slow")))
    assert result.mask[1, 1]
    assert batch_left >= 2, "the click waited for the batch queue"
    assert elapsed < 1.5

    # SIGTERM while busy with a batch job: that job finishes, the worker exits cleanly.
    _wait_for(lambda: _presence(rconn, "prio")["state"] == "busy", step=0.02)
    worker.terminate()
    assert worker.wait(10) == 0
    assert _count(rconn, "encodes", "test-slow") == _count(rconn, "encode-start", "test-slow")
    assert rconn.llen(Keys.queue_list(Keys().batch("test-slow"))) >= 1  # left for other workers


def test_worker_killed_mid_job_is_retried_once_then_fails_fast(spawn, make_dispatcher, rconn):
    workers = {w.pid: w for w in (spawn("k1", ["test-sleepy"]), spawn("k2", ["test-sleepy"]))}
    for worker in workers.values():
        worker.wait_ready(rconn)
    dispatcher = make_dispatcher(job_timeout=10)
    log_key = "test:log:test-sleepy"

    def click_in_thread(seed: int) -> dict:
        outcome: dict = {}

        def run() -> None:
            started = time.monotonic()
            try:
                outcome["result"] = dispatcher.segment(
                    "test-sleepy", _png(seed), Prompt((Click(2, 2),))
                )
            except TapmaskError as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

        outcome["thread"] = threading.Thread(target=run)
        outcome["thread"].start()
        return outcome

    def kill_the_one_encoding() -> WorkerProcess:
        while True:
            _, entry = rconn.blpop(log_key, timeout=10)
            what, pid = entry.decode().split()
            if what == "encode-start":
                victim = workers.pop(int(pid))
                victim.kill()
                victim.wait()
                return victim

    rconn.delete(log_key)
    outcome = click_in_thread(30)
    victim = kill_the_one_encoding()
    outcome["thread"].join(20)
    assert "error" not in outcome, outcome.get("error")
    (survivor,) = workers.values()
    assert outcome["result"].extra["worker"] == survivor.name != victim.name
    assert outcome["seconds"] < 10  # well within the job timeout

    rconn.delete(log_key)
    outcome = click_in_thread(31)
    kill_the_one_encoding()  # the last worker serving this model
    killed_at = time.monotonic()
    outcome["thread"].join(20)
    assert isinstance(outcome.get("error"), Unavailable) and outcome["error"].status == 503
    assert time.monotonic() - killed_at < 5


def test_poisoned_jobs_fail_alone(spawn, make_dispatcher, rconn):
    worker = spawn("poison", ["test-counting", "test-snooze"]).wait_ready(rconn)
    dispatcher = make_dispatcher()
    with pytest.raises(ImageError) as info:
        dispatcher.segment("test-counting", b"not an image at all", Prompt((Click(1, 1),)))
    assert info.value.status == 400 and info.value.code == "bad_image"
    with pytest.raises(PromptError):
        dispatcher.segment("test-counting", _png(3), Prompt((Click(500, 1),)))
    with pytest.raises(Timeout) as timeout:  # the worker's job timeout: 504, worker survives
        make_dispatcher(job_timeout=1).segment("test-snooze", _png(4), Prompt((Click(1, 1),)))
    assert timeout.value.status == 504
    garbage = Queue(
        Keys().interactive("test-counting"), connection=rconn, serializer=JSONSerializer
    ).enqueue_call(SEGMENT_JOB, args=({"v": 1, "model": 5, "image": []},), timeout=5)
    reply = _wait_for(lambda: garbage.latest_result(timeout=1)).return_value
    assert reply["ok"] is False and reply["status"] == 404
    assert dispatcher.segment("test-counting", _png(5), Prompt((Click(1, 1),))).mask[1, 1]
    assert worker.proc.poll() is None
    assert _wait_for(lambda: _presence(rconn, "poison")["errors"] == 4)


class _Smuggled:
    """Unpickling this runs ``touch(path)``: what a pickle-accepting worker would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        from tests.support.queue_models import touch

        return (touch, (self.path,))


def test_only_json_jobs_for_tapmask_functions_run(spawn, make_dispatcher, rconn, tmp_path):
    worker = spawn("strict", ["test-counting"]).wait_ready(rconn)
    queue_name = Keys().interactive("test-counting")
    pickled_marker, json_marker = tmp_path / "pickled", tmp_path / "json"
    pickled = Queue(queue_name, connection=rconn).enqueue_call(  # rq's default: pickle
        "tests.support.queue_models.touch", args=(_Smuggled(str(pickled_marker)),)
    )
    foreign = Queue(queue_name, connection=rconn, serializer=JSONSerializer).enqueue_call(
        "tests.support.queue_models.touch", args=(str(json_marker),)
    )
    for job in (pickled, foreign):
        result = _wait_for(lambda job=job: Result.fetch_latest(job, serializer=JSONSerializer))
        assert result.type == Result.Type.FAILED
        assert "RejectedJob" in result.exc_string or "DeserializationError" in result.exc_string
    assert Job.fetch(foreign.id, connection=rconn, serializer=JSONSerializer).get_status() == (
        "failed"
    )
    assert not pickled_marker.exists() and not json_marker.exists()
    ok = make_dispatcher().segment("test-counting", _png(6), Prompt((Click(2, 2),)))
    assert ok.mask[2, 2] and worker.proc.poll() is None


def test_redis_restart_gives_503_then_recovers(spawn, make_dispatcher, rconn, server):
    worker = spawn("survivor", ["test-counting"]).wait_ready(rconn)
    dispatcher = make_dispatcher()
    image, unseen = _png(8), _png(9)
    assert dispatcher.segment("test-counting", image, Prompt((Click(1, 1),))).mask[1, 1]
    dispatcher._store_image(unseen)  # in Redis (and the dispatcher knows it), not on the worker

    server.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        dispatcher.segment("test-counting", image, Prompt((Click(1, 1), Click(2, 2))))
    assert info.value.status == 503 and time.monotonic() - started < 3
    with pytest.raises(Unavailable):
        dispatcher.prefetch("test-counting", _png(10))

    server.start()  # empty: no image, no queues, no registrations

    def click_works():
        try:
            return dispatcher.segment("test-counting", image, Prompt((Click(1, 1), Click(2, 2))))
        except Unavailable:
            return None

    result = _wait_for(click_works, timeout=20, step=0.2)
    assert result.mask.sum() == 2 and result.extra["worker"] == "survivor"
    assert worker.proc.poll() is None  # the same process reconnected by itself
    # Redis lost `unseen`; the worker answers unknown_image and the dispatcher resends it once.
    assert dispatcher.segment("test-counting", unseen, Prompt((Click(4, 4),))).mask[4, 4]
    assert rconn.exists(Keys().image(images.sha256(unseen)))


def test_sigterm_right_after_start_is_a_prompt_warm_shutdown(spawn, rconn):
    """A worker drained seconds after it started (a Kubernetes scale-down, a rollout) exits at
    once: rq's command-channel thread used to hold the shutdown for up to 60 s."""
    for attempt in range(3):
        worker = spawn(f"early-{attempt}", ["test-counting"]).wait_ready(rconn)
        worker.terminate()
        started = time.monotonic()
        assert worker.wait(10) == 0
        assert time.monotonic() - started < 3
        assert _presence(rconn, f"early-{attempt}") is None


def test_a_worker_encodes_the_images_waiting_for_it_in_one_pass(spawn, make_dispatcher, rconn):
    dispatcher = make_dispatcher(queue_ttl=20, job_timeout=20)
    pngs = [_png(100 + i) for i in range(5)]
    for png in pngs:  # queued before any worker runs: they wait together
        dispatcher.prefetch("test-batching", png)
    batcher = spawn(
        "batcher", ["test-batching"], extra_args=["--encode-batch", "4", "--encode-batch-clicks"]
    ).wait_ready(rconn)
    _wait_for(lambda: _count(rconn, "encodes", "test-batching") == 5)
    batcher.stop()  # the clicks below must wait for the next worker, all together
    passes = [int(n) for n in rconn.lrange("test:passes:test-batching", 0, -1)]
    assert passes == [4, 1]

    # Clicks queued together are batched too when asked, and each gets its own mask.
    rconn.delete("test:passes:test-batching")
    queued = _queue_clicks(dispatcher, rconn, [_png(200 + i) for i in range(3)])
    spawn(
        "batch-clicks",
        ["test-batching"],
        extra_args=["--encode-batch", "4", "--encode-batch-clicks"],
    ).wait_ready(rconn)
    for index, job in enumerate(queued):
        reply = _wait_for(lambda job=job: job.latest_result(timeout=1)).return_value
        mask = protocol.parse_segmentation_reply(reply).mask
        assert mask[2, index + 1] and mask.sum() == 1
    assert rconn.lrange("test:passes:test-batching", 0, -1) == [b"3"]


def _queue_clicks(dispatcher, rconn, pngs: list[bytes]) -> list[Job]:
    """Click jobs queued while no worker runs (as a burst of annotators would queue them)."""
    queue = Queue(Keys().interactive("test-batching"), connection=rconn, serializer=JSONSerializer)
    jobs = []
    for index, png in enumerate(pngs):
        sha = dispatcher._store_image(png)
        prompt = Prompt((Click(index + 1, 2),))
        payload = protocol.SegmentJob("test-batching", sha, prompt).to_payload()
        jobs.append(queue.enqueue_call(SEGMENT_JOB, args=(payload,), timeout=20, result_ttl=60))
    return jobs


def test_a_lone_click_is_encoded_alone(spawn, make_dispatcher, rconn):
    spawn("loner", ["test-batching"], extra_args=["--encode-batch-wait-ms", "5000"]).wait_ready(
        rconn
    )
    dispatcher = make_dispatcher()
    rconn.delete("test:passes:test-batching")
    started = time.monotonic()
    dispatcher.segment("test-batching", _png(300), Prompt((Click(1, 1),)))
    assert time.monotonic() - started < 4  # the wait is for prefetches, never for a click
    assert rconn.lrange("test:passes:test-batching", 0, -1) == [b"1"]


def test_clicks_are_not_batched_unless_asked(spawn, make_dispatcher, rconn):
    """Batched clicks all wait for the whole pass: by default each click is encoded alone."""
    rconn.delete("test:passes:test-batching")
    queued = _queue_clicks(make_dispatcher(), rconn, [_png(400 + i) for i in range(3)])
    spawn("plain", ["test-batching"]).wait_ready(rconn)
    for job in queued:
        assert _wait_for(lambda job=job: job.latest_result(timeout=1)).return_value["ok"]
    assert rconn.lrange("test:passes:test-batching", 0, -1) == [b"1", b"1", b"1"]


def test_job_input_is_bounded_before_the_worker_does_any_work(spawn, make_dispatcher, rconn):
    """Counts, sizes and numbers a job carries are refused by the worker (issue 14) with their
    own codes, fast, without an encode; the worker serves the next click."""
    model = "test-counting"
    worker = spawn("bounds", [model], env={"TAPMASK_MAX_IMAGE_MB": "0.01"})
    worker.wait_ready(rconn)
    encodes = _count(rconn, "encodes", model)  # the counter is shared with earlier tests
    data = _png(11)  # 40×30 noise, ~3.6 KB: under the worker's 10 KiB image limit
    sha = images.sha256(data)
    rconn.set(Keys().image(sha), data)
    queue = Queue(Keys().interactive(model), connection=rconn, serializer=JSONSerializer)
    base = {"v": 1, "model": model, "image": sha}
    hostile = {
        "too_many_clicks": {**base, "prompt": {"clicks": [[1, 1, True]] * 101, "box": None}},
        "request_too_large": {
            **base,
            "prompt": {"clicks": [[1, 1, True]], "box": None},
            "previous_mask": {"size": [100_000, 100_000], "counts": "0"},
        },
        "bad_prompt": {**base, "prompt": {"clicks": [[10**400, 1, True]], "box": None}},
    }
    for code, payload in hostile.items():
        started = time.monotonic()
        job = queue.enqueue_call(SEGMENT_JOB, args=(payload,), timeout=5)
        reply = _wait_for(lambda job=job: job.latest_result(timeout=1)).return_value
        assert reply["ok"] is False and reply["error"] == code, reply
        assert 400 <= reply["status"] < 500 and time.monotonic() - started < 2.0
    assert _count(rconn, "encodes", model) == encodes  # nothing was decoded or encoded
    dispatcher = make_dispatcher()
    with pytest.raises(ImageTooLarge, match="TAPMASK_MAX_IMAGE_MB"):
        dispatcher.segment(model, _png(12, 100, 100), Prompt((Click(1, 1),)))
    assert dispatcher.segment(model, data, Prompt((Click(3, 4),))).mask[4, 3]
    assert worker.proc.poll() is None
