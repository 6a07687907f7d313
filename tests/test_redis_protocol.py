"""The Redis protocol both sides share, without a server: names, codecs, refusals."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from backends.errors import (
    ImageTooLarge,
    InvalidRequest,
    ModelNotFound,
    PromptError,
    TapmaskError,
    TooManyClicks,
)
from backends.prompts import Box, Click, Prompt, Segmentation
from backends.redis import jobs, protocol
from backends.redis.protocol import ExportJob, Keys, PrefetchJob, SegmentJob


def test_every_job_name_the_dispatcher_sends_imports_as_the_function_the_worker_runs():
    assert set(jobs.JOB_FUNCTIONS) == protocol.JOB_NAMES
    for name, function in jobs.JOB_FUNCTIONS.items():
        module, _, attribute = name.rpartition(".")
        assert getattr(importlib.import_module(module), attribute) is function


def test_queue_names_and_the_lists_rq_keeps_them_in():
    keys = Keys("ns")
    assert keys.interactive("sam-vit_h") == "ns:sam-vit_h:interactive"
    assert keys.queue_list(keys.batch("edgetam")) == "rq:queue:ns:edgetam:batch"
    assert keys.parse_queue("rq:queue:ns:sam2.1-hiera-tiny:batch") == ("sam2.1-hiera-tiny", "batch")
    assert keys.parse_queue("ns:grabcut:interactive") == ("grabcut", "interactive")
    for foreign in ("other:grabcut:batch", "ns:grabcut:later", "ns:img:abc", "ns::batch"):
        assert keys.parse_queue(foreign) is None
    with pytest.raises(ValueError):
        keys.queue("grabcut", "urgent")


def test_jobs_round_trip_through_json():
    sha = "a" * 64
    previous = np.zeros((6, 8), bool)
    previous[2:4, 3:6] = True
    prompt = Prompt((Click(1.5, 2.0), Click(4, 4, False)), Box(0, 0, 5, 5), previous)
    back = SegmentJob.from_payload(SegmentJob("grabcut", sha, prompt).to_payload())
    assert back.model == "grabcut" and back.image == sha
    assert back.prompt.clicks == prompt.clicks and back.prompt.box == prompt.box
    assert np.array_equal(back.prompt.previous_mask, previous)
    assert PrefetchJob.from_payload(PrefetchJob("m", sha).to_payload()) == PrefetchJob("m", sha)
    assert ExportJob.from_payload(ExportJob("m", sha, "float32").to_payload()).dtype == "float32"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"v": 2, "model": "m", "image": "a" * 64}, InvalidRequest),
        ({"v": 1, "model": "../etc", "image": "a" * 64}, ModelNotFound),
        ({"v": 1, "model": "m", "image": "not-a-sha"}, PromptError),
        ({"v": 1, "model": "m", "image": "a" * 64, "dtype": "float64"}, InvalidRequest),
    ],
)
def test_malformed_jobs_are_refused_before_any_work(payload, error):
    with pytest.raises(error):
        ExportJob.from_payload(payload)


def test_segmentation_reply_round_trip():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:5] = True
    reply = protocol.segmentation_reply(Segmentation(mask, 0.75, "grabcut"), "w1")
    back = protocol.parse_segmentation_reply(reply)
    assert np.array_equal(back.mask, mask) and back.score == 0.75 and back.extra["worker"] == "w1"


def _segment(prompt=None, **extra):
    return {
        "v": 1,
        "model": "m",
        "image": "a" * 64,
        "prompt": {"clicks": [[1, 2, True]], "box": None} if prompt is None else prompt,
        **extra,
    }


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (_segment({"clicks": [[1, 2, True]] * 101}), "too_many_clicks"),
        (_segment({"clicks": "1,2"}), "bad_prompt"),
        (_segment({"clicks": [[10**400, 2, True]]}), "bad_prompt"),
        (_segment({"clicks": [[[1, 2], 2, True]]}), "bad_prompt"),
        (_segment({"clicks": [[1, 2]]}), "bad_prompt"),
        (_segment({"clicks": [], "box": [1, 2, 3]}), "bad_prompt"),
        (_segment({"clicks": [], "box": "0,0,5,5"}), "bad_prompt"),
        (_segment({"clicks": [], "box": [0, 0, 10**400, 5]}), "bad_prompt"),
        (_segment("click here"), "bad_prompt"),
        (_segment(previous_mask={"size": [100_000, 100_000], "counts": "0"}), "request_too_large"),
        (_segment(previous_mask={"size": [10, 10], "counts": [1] * 1000}), "bad_prompt"),
        (_segment(previous_mask={"size": [10, 10.5], "counts": "0"}), "bad_prompt"),
        (_segment(previous_mask={"size": [10, 10], "counts": 5}), "bad_prompt"),
        (_segment(previous_mask=[1, 2]), "bad_prompt"),
    ],
)
def test_segment_jobs_are_bounded_before_anything_is_decoded(payload, code):
    with pytest.raises(TapmaskError) as info:
        SegmentJob.from_payload(payload)
    assert info.value.code == code and 400 <= info.value.status < 500


def test_job_bounds_follow_their_settings(monkeypatch):
    payload = _segment({"clicks": [[1, 2, True]] * 5})
    assert len(SegmentJob.from_payload(payload).prompt.clicks) == 5
    monkeypatch.setenv("TAPMASK_MAX_CLICKS", "4")
    with pytest.raises(TooManyClicks, match="TAPMASK_MAX_CLICKS"):
        SegmentJob.from_payload(payload)
    monkeypatch.setenv("TAPMASK_MAX_IMAGE_MB", "0.001")
    with pytest.raises(ImageTooLarge, match="TAPMASK_MAX_IMAGE_MB"):
        protocol.check_image_bytes(b"x" * 2000)
    assert protocol.check_image_bytes(b"x" * 1000) == b"x" * 1000
