"""Tracking across a pool: states shared through the Redis ``trk`` tier, TRACK jobs through real
workers, and a frame's answer independent of which engine or worker served the frame before."""

from __future__ import annotations

import numpy as np
import pytest

from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.errors import PromptError, TooManyObjects
from backends.prompts import Box, Click, TrackTarget
from backends.redis.dispatcher import RedisDispatcher
from backends.redis.embeddings import RedisEmbeddingStore
from backends.redis.protocol import PROTOCOL_VERSION, Keys
from backends.redis.tracking import TrackJob
from backends.video.synthetic import build_clip
from tests.support.processes import RedisServer, WorkerProcess

FRAMES = 8


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def clip(grabcut_dir):
    return build_clip(grabcut_dir, objects=2, frames=30, width=320, height=180, seed=1)


def _engine(server, store: bool = True) -> LocalDispatcher:
    shared = RedisEmbeddingStore(server.client(), Keys(), tier="trk", ttl=60) if store else None
    engine = Engine(shared_track_states=shared)
    engine.load(["flow"])
    return LocalDispatcher(engine)


def _run(dispatchers, clip) -> list[list[np.ndarray]]:
    """Track FRAMES frames, frame i served by dispatchers[i % len]; masks per frame."""
    _, truth = clip.frame(0)
    targets = [TrackTarget(mask=m) for m in truth]
    out = []
    for index in range(FRAMES):
        answers = dispatchers[index % len(dispatchers)].track("flow", clip.encoded(index), targets)
        out.append([a.mask for a in answers])
        targets = [TrackTarget(box=Box(0, 0, 1, 1), state=a.state) for a in answers]
    return out


def test_the_next_frame_can_be_served_by_another_engine(server, clip):
    alone = _run([_engine(server, store=False)], clip)
    first, second = _engine(server), _engine(server)
    alternating = _run([first, second], clip)
    for frame_alone, frame_pool in zip(alone, alternating, strict=True):
        for a, b in zip(frame_alone, frame_pool, strict=True):
            np.testing.assert_array_equal(a, b)
    stats = [d.engine.tracking.stats for d in (first, second)]
    assert sum(s.shared_hits for s in stats) == 2 * (FRAMES - 1)
    assert sum(s.refused_handles for s in stats) == 0
    assert server.client().keys("tapmask:trk:flow:*")


def test_an_expired_shared_state_reinitialises_from_the_shape(server, clip):
    first, second = _engine(server), _engine(server)
    _, truth = clip.frame(0)
    answer = first.track("flow", clip.encoded(0), [TrackTarget(mask=truth[0])])[0]
    server.client().delete(f"tapmask:trk:flow:{answer.state}")
    shape = TrackTarget(mask=truth[0], state=answer.state)
    again = second.track("flow", clip.encoded(1), [shape])[0]
    assert second.engine.tracking.stats.refused_handles == 1
    np.testing.assert_array_equal(again.mask, truth[0])  # started from the shape sent


def test_track_jobs_through_a_real_worker_pool(server, clip, tmp_path):
    workers = [
        WorkerProcess(server.url, ["flow"], name=f"trk{k}", log_dir=str(tmp_path)) for k in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready(server.client())
        remote = RedisDispatcher(server.url, ["flow"], queue_ttl=5, job_timeout=20)
        expected = _run([_engine(server, store=False)], clip)
        got = _run([remote], clip)
        for frame_local, frame_remote in zip(expected, got, strict=True):
            for a, b in zip(frame_local, frame_remote, strict=True):
                np.testing.assert_array_equal(a, b)
        with pytest.raises(TooManyObjects):
            remote.track("flow", clip.encoded(0), [TrackTarget(box=Box(1, 1, 9, 9))] * 33)
        with pytest.raises(PromptError):
            remote.track("flow", clip.encoded(0), [TrackTarget(box=Box(1, 1, 9000, 9))])
        remote.close()
    finally:
        for worker in workers:
            worker.stop(timeout=5)


def test_the_worker_side_codec_refuses_malformed_jobs():
    base = {"v": PROTOCOL_VERSION, "model": "flow", "image": "0" * 64}
    for targets in ("x", [1], [{"box": [1, 2]}], [{"polygon": "abc"}], [{"box": None}]):
        with pytest.raises(PromptError):
            TrackJob.from_payload({**base, "targets": targets})
    for targets in ([{"clicks": "x"}], [{"clicks": [[1, 2]]}], [{"clicks": [["a", 2, True]]}]):
        with pytest.raises(PromptError):
            TrackJob.from_payload({**base, "targets": targets})
    job = TrackJob.from_payload({**base, "targets": [{"box": [1, 2, 3, 4], "state": 7}]})
    assert job.targets[0].state is None and job.targets[0].box == Box(1, 2, 3, 4)
    sent = TrackJob("flow", "0" * 64, (TrackTarget(clicks=(Click(3, 4), Click(5, 6, False))),))
    parsed = TrackJob.from_payload(sent.to_payload())
    assert parsed.targets[0].clicks == (Click(3, 4), Click(5, 6, False))
