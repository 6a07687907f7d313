"""The tracking seam with the weights-free flow tracker: a synthetic clip from GrabCut objects,
handles carried between frames, and every kind of unusable handle re-initialising."""

from __future__ import annotations

import numpy as np
import pytest

from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.errors import PromptError, TooManyObjects, TooManyPoints, Unsupported
from backends.masks import largest_polygon
from backends.models import registry
from backends.prompts import Box, Click, TrackTarget, valid_handle
from backends.video.synthetic import build_clip, iou


@pytest.fixture(scope="module")
def clip(grabcut_dir):
    return build_clip(grabcut_dir, objects=2, frames=60, width=480, height=270, seed=0)


@pytest.fixture()
def dispatcher():
    engine = Engine()
    engine.load(["flow", "grabcut"])
    yield LocalDispatcher(engine)


def _track_clip(dispatcher, clip, frames, first_targets):
    """Track ``frames`` frames; returns per-object IoU lists against the visible ground truth."""
    answers = dispatcher.track("flow", clip.encoded(0), first_targets)
    states = [a.state for a in answers]
    ious: list[list[float]] = [[] for _ in answers]
    for index in range(1, frames):
        data = clip.encoded(index)
        _, truth = clip.frame(index)
        answers = dispatcher.track(
            "flow", data, [TrackTarget(box=Box(0, 0, 1, 1), state=s) for s in states]
        )
        states = [a.state for a in answers]
        for k, answer in enumerate(answers):
            ious[k].append(iou(answer.mask, truth[k]))
    return ious


def test_flow_tracker_follows_grabcut_objects_over_60_frames(dispatcher, clip):
    _, truth = clip.frame(0)
    targets = [TrackTarget(mask=m) for m in truth]
    ious = _track_clip(dispatcher, clip, 60, targets)
    means = [float(np.mean(values)) for values in ious]
    print("flow tracker mean IoU per object over 60 frames:", [round(m, 3) for m in means])
    assert float(np.mean(means)) >= 0.7, means
    assert min(means) >= 0.6, means


def test_a_polygon_or_a_box_starts_tracking_too(dispatcher, clip):
    _, truth = clip.frame(0)
    polygon = largest_polygon(truth[0])
    assert polygon is not None
    bbox = np.argwhere(truth[1])
    box = Box(bbox[:, 1].min(), bbox[:, 0].min(), bbox[:, 1].max(), bbox[:, 0].max())
    targets = [TrackTarget(polygon=tuple(map(tuple, polygon))), TrackTarget(box=box)]
    first = dispatcher.track("flow", clip.encoded(0), targets)
    assert iou(first[0].mask, truth[0]) > 0.9
    assert iou(first[1].mask, truth[1]) > 0.5  # GrabCut inside the box
    assert all(valid_handle(a.state) and not a.lost for a in first)


def test_unusable_handles_reinitialise_from_the_shape(dispatcher, clip):
    _, truth = clip.frame(5)
    data = clip.encoded(5)
    engine = dispatcher.engine
    for handle in (None, "x" * 24, "not a handle!", "A" * 65, 12345, "../../etc/passwd"):
        answers = dispatcher.track("flow", data, [TrackTarget(mask=truth[0], state=handle)])
        assert iou(answers[0].mask, truth[0]) > 0.95  # started from the shape sent
        assert valid_handle(answers[0].state) and answers[0].state != handle
    assert engine.tracking.stats.refused_handles == 5
    assert engine.tracking.stats.stepped == 0


def test_each_answer_gets_its_own_handle_and_old_handles_still_work(dispatcher, clip):
    _, truth = clip.frame(0)
    first = dispatcher.track("flow", clip.encoded(0), [TrackTarget(mask=truth[0])])[0]
    shape = TrackTarget(box=Box(0, 0, 5, 5), state=first.state)
    second = dispatcher.track("flow", clip.encoded(1), [shape])[0]
    again = dispatcher.track("flow", clip.encoded(1), [shape])[0]  # a tool stepping back
    assert second.state != first.state != again.state
    np.testing.assert_array_equal(second.mask, again.mask)
    assert dispatcher.engine.tracking.stats.stepped == 2


def test_track_requests_are_bounded_and_checked(dispatcher, clip, monkeypatch):
    data = clip.encoded(0)
    monkeypatch.setenv("TAPMASK_MAX_TRACKED_OBJECTS", "2")
    with pytest.raises(TooManyObjects):
        dispatcher.track("flow", data, [TrackTarget(box=Box(1, 1, 9, 9))] * 3)
    monkeypatch.setenv("TAPMASK_MAX_SHAPE_POINTS", "4")
    with pytest.raises(TooManyPoints):
        TrackTarget(polygon=((1, 1), (5, 1), (5, 5), (1, 5), (1, 3)))
    with pytest.raises(PromptError):
        dispatcher.track("flow", data, [TrackTarget(box=Box(1, 1, 5000, 9))])
    with pytest.raises(PromptError):
        TrackTarget(box=Box(1, 1, 2, 2), polygon=((1, 1), (2, 2), (3, 1)))
    with pytest.raises(Unsupported):
        dispatcher.track("grabcut", data, [TrackTarget(box=Box(1, 1, 9, 9))])
    assert "flow" in registry.trackers()


def test_clicks_start_tracking_and_are_checked(dispatcher, clip):
    _, truth = clip.frame(0)
    ys, xs = np.nonzero(truth[1])
    inside = (float(np.median(xs)), float(np.median(ys)))
    if not truth[1][round(inside[1]), round(inside[0])]:
        inside = (float(xs[len(xs) // 2]), float(ys[len(ys) // 2]))
    target = TrackTarget(clicks=(Click(*inside),))
    first = dispatcher.track("flow", clip.encoded(0), [target])[0]
    assert iou(first.mask, truth[1]) > 0.5 and target.kind == "clicks"
    after = dispatcher.track(
        "flow", clip.encoded(1), [TrackTarget(box=Box(0, 0, 1, 1), state=first.state)]
    )
    assert after[0].mask.any()
    with pytest.raises(PromptError):
        TrackTarget(clicks=(Click(1, 1),), polygon=((1, 1), (5, 1), (5, 5)))
    with pytest.raises(PromptError):
        TrackTarget(clicks=(Click(1, 1, positive=False),))
    with pytest.raises(PromptError):
        dispatcher.track("flow", clip.encoded(0), [TrackTarget(clicks=(Click(9000, 1),))])
