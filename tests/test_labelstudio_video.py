"""Label Studio video regions: the backend tracks a keyframe box through a real MP4 file.

The backend runs as its own process (``tapmask serve labelstudio``, the flow tracker) and
downloads the video from a local file host; the clip is a synthetic one built from GrabCut
objects with per-frame ground truth (``backends.video.synthetic``), so the answer's boxes are
checked against where the object really is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from backends.errors import InvalidRequest, TooManyObjects
from backends.labelstudio.labelconfig import LabelConfig, VideoTag
from backends.labelstudio.videoregions import (
    frame_index,
    framerate,
    frames_count,
    parse_region,
    regions_from_context,
)
from backends.video.synthetic import build_clip
from tests.conftest import REPO
from tests.support.servers import BackendProcess
from tests.support.video_clips import box_iou, file_host, percent_box, write_mp4

# The labeling config users copy from the README: the tests prove that one works.
CONFIG = (
    (REPO / "README.md")
    .read_text()
    .split("<!-- video-labeling-config -->\n```xml\n")[1]
    .split("```")[0]
)
FPS = 25.0


def _region(keyframes: list[dict], region_id: str = "vid_1", labels=("Object",)) -> dict:
    """A region as Label Studio 1.23.2's editor serialises it (``VideoRegion.serialize``)."""
    return {
        "id": region_id,
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "origin": "manual",
        "value": {
            "framesCount": 60,
            "duration": 2.4,
            "sequence": [
                {"enabled": True, "rotation": 0, "time": k["frame"] / FPS, **k} for k in keyframes
            ],
            "labels": list(labels),
        },
    }


def _predict(url: str, video_url: str, regions: list[dict]) -> dict:
    return {
        "tasks": [{"id": 7, "data": {"video": video_url}, "annotations": [], "predictions": []}],
        "project": "3.1795267061",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": {"result": regions}},
    }


# --------------------------------------------------------------------------------------------
# Regions, frames and framerates (no server)


def test_the_readme_config_declares_the_video_and_its_framerate():
    config = LabelConfig.parse(CONFIG)
    assert config.videos == {"video": VideoTag("video", "video", "25")}
    assert [(c.name, c.type, c.to_name) for c in config.controls] == [
        ("box", "videorectangle", "video")
    ]


def test_label_studio_frames_map_to_decoded_frames_through_the_task_framerate():
    # Frame 1 is the first decoded frame; Label Studio's framerate, not the container's, counts.
    assert [frame_index(f, 25.0, 25.0, 60) for f in (1, 2, 60, 61, 500)] == [0, 1, 59, 59, 59]
    assert frame_index(3, 12.5, 25.0, 60) == 4  # a config at half the real rate skips frames
    assert frames_count(2.4, 25.0) == 60
    tag = VideoTag("video", "video", "$fps")
    assert framerate(tag, {"fps": 30}) == 30.0
    assert framerate(tag, {"fps": 0.5}) == 2.0  # Label Studio inverts a rate under 1
    assert framerate(tag, {}) == 24.0  # and falls back to 24
    assert framerate(VideoTag("v", "v", "nonsense"), None) == 24.0


def test_a_region_is_tracked_from_a_keyframe_the_annotator_placed():
    drawn = parse_region(_region([{"frame": 9, "x": 1, "y": 2, "width": 3, "height": 4}]), "r")
    assert drawn.start().frame == 9
    # Tracked already (the last two keyframes on consecutive frames): nothing to do.
    tracked = parse_region(
        _region([{"frame": f, "x": 1, "y": 2, "width": 3, "height": 4} for f in (9, 10, 11)]),
        "r",
    )
    assert tracked.start() is None
    # A keyframe placed after the track: tracked on from there.
    moved_on = parse_region(
        _region([{"frame": f, "x": 1, "y": 2, "width": 3, "height": 4} for f in (9, 10, 40)]),
        "r",
    )
    assert moved_on.start().frame == 40
    ended = parse_region(
        _region([{"frame": 9, "x": 1, "y": 2, "width": 3, "height": 4, "enabled": False}]), "r"
    )
    assert ended.start() is None


@pytest.mark.parametrize(
    ("keyframe", "problem"),
    [
        ({"frame": 0, "x": 1, "y": 1, "width": 1, "height": 1}, "frame"),
        ({"frame": 1.5, "x": 1, "y": 1, "width": 1, "height": 1}, "frame"),
        ({"frame": 1, "x": "1", "y": 1, "width": 1, "height": 1}, ".x"),
        ({"frame": 1, "x": 1, "y": 1, "width": -1, "height": 1}, "negative"),
        ({"frame": 1, "x": float("nan"), "y": 1, "width": 1, "height": 1}, ".x"),
    ],
)
def test_malformed_keyframes_are_refused_naming_the_field(keyframe, problem):
    with pytest.raises(InvalidRequest) as caught:
        regions_from_context([_region([keyframe])])
    assert problem in str(caught.value) and caught.value.status == 422


def test_too_many_regions_to_track_are_refused_before_any_download(monkeypatch):
    monkeypatch.setenv("TAPMASK_MAX_OBJECTS", "2")
    box = {"x": 1, "y": 1, "width": 1, "height": 1}
    with pytest.raises(TooManyObjects):
        regions_from_context([_region([{"frame": 1, **box}])] * 3)
    # Regions tracked already come along (Label Studio sends the label's every region) and
    # do not count: a long video with many tracked objects still takes a new one.
    tracked = _region([{"frame": f, **box} for f in (1, 2, 3)])
    assert len(regions_from_context([tracked] * 10 + [_region([{"frame": 1, **box}])])) == 11


# --------------------------------------------------------------------------------------------
# The backend process, a real MP4 file


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory, grabcut_dir) -> tuple[Path, list[list[np.ndarray]]]:
    folder = tmp_path_factory.mktemp("videos")
    clip = build_clip(grabcut_dir, objects=2, frames=60, width=640, height=360, seed=0)
    truth = write_mp4(clip, folder / "clip.mp4", FPS)
    return folder, truth


@pytest.fixture(scope="module")
def host(clip_files) -> Iterator[str]:
    with file_host(clip_files[0]) as url:
        yield url


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> Iterator[BackendProcess]:
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    server = BackendProcess({}, log)  # defaults: the flow tracker, 4 s of video a request
    try:
        yield server
    finally:
        server.close()


def test_a_keyframe_box_is_tracked_through_the_clip(backend, host, clip_files):
    _, truth = clip_files
    start = percent_box(truth[0][0])  # object 0 on frame 1 (the first decoded frame)
    payload = _predict(backend.url, f"{host}/clip.mp4", [_region([{"frame": 1, **start}])])
    response = backend.http.post("/predict", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    [region] = prediction["result"]
    assert region["id"] == "vid_1"  # Label Studio replaces the annotator's region with it
    assert (region["type"], region["from_name"], region["to_name"]) == (
        "videorectangle",
        "box",
        "video",
    )
    value = region["value"]
    assert value["labels"] == ["Object"]
    assert (value["framesCount"], value["duration"]) == (60, 2.4)
    sequence = value["sequence"]
    frames = [k["frame"] for k in sequence]
    assert frames == sorted(frames) and frames[0] == 1 and frames[-1] <= 60
    assert len(frames) >= 50  # one keyframe a frame while the object is followed
    for k in sequence:
        assert set(k) == {"frame", "enabled", "rotation", "x", "y", "width", "height", "time"}
        assert k["time"] == pytest.approx(k["frame"] / FPS)
    # The boxes follow the ground truth: LS frame f is decoded frame f - 1.
    ious = [box_iou(k, truth[k["frame"] - 1][0]) for k in sequence]
    assert np.mean(ious) >= 0.7, ious
    print(f"\nbox IoU over {len(ious)} frames: mean {np.mean(ious):.3f}, min {min(ious):.3f}")
    # Another region on the same video: no download, no decoding (its frames are cached).
    decoded, hits = _frame_cache(backend)
    later = _region([{"frame": 51, **percent_box(truth[50][0])}], "vid_2")
    again = backend.http.post("/predict", json=_predict("", f"{host}/clip.mp4", [later]))
    assert [k["frame"] for k in again.json()["results"][0]["result"][0]["value"]["sequence"]] == (
        list(range(51, 61))
    )
    assert _frame_cache(backend) == (decoded, hits + 10)


def _frame_cache(backend: BackendProcess) -> tuple[float, float]:
    """The backend's decoded-frame cache: (frames decoded, frames served from the cache)."""
    values = {}
    for line in backend.http.get("/metrics").text.splitlines():
        for kind in ("misses", "hits"):
            if line.startswith(f'tapmask_cache_{kind}_total{{cache="video-frames"}}'):
                values[kind] = float(line.split()[-1])
    return values["misses"], values["hits"]


def test_an_object_that_leaves_the_frame_ends_its_track(backend, tmp_path):
    # A textured square moving right 8 px a frame over a still background: it leaves the
    # 320-px frame on frame 22 (decoded 21: x = 318).
    rng = np.random.default_rng(1)
    background = cv2.GaussianBlur(rng.integers(0, 255, (180, 320, 3), dtype=np.uint8), (0, 0), 3)
    background = (background * 0.5 + 60).astype(np.uint8)
    square = cv2.GaussianBlur(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8), (0, 0), 1.5)
    square[:, :, 0] = 255
    writer = cv2.VideoWriter(
        str(tmp_path / "exit.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (320, 180)
    )
    for i in range(40):
        frame = background.copy()
        x = 150 + 8 * i
        if x < 320:
            frame[60:110, x : min(320, x + 50)] = square[:, : min(50, 320 - x)]
        writer.write(frame)
    writer.release()
    start = {"frame": 1, "x": 150 / 320 * 100, "y": 60 / 180 * 100, "width": 50 / 320 * 100}
    start["height"] = 50 / 180 * 100
    with file_host(tmp_path) as url:
        payload = _predict(backend.url, f"{url}/exit.mp4", [_region([start])])
        response = backend.http.post("/predict", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    sequence = response.json()["results"][0]["result"][0]["value"]["sequence"]
    *shown, last = sequence
    assert all(k["enabled"] for k in shown)
    assert last["enabled"] is False  # hidden after its last frame in view
    assert 18 <= last["frame"] <= 22
    assert last["x"] + last["width"] == pytest.approx(100, abs=3)  # at the right edge


def test_a_request_with_nothing_to_track_answers_an_empty_result(backend, host):
    # Deleting a region, or relabelling a tracked one, sends the label's tracked regions.
    box = {"x": 10, "y": 10, "width": 20, "height": 20}
    tracked = _region([{"frame": f, **box} for f in (1, 2, 3)])
    payload = _predict(backend.url, f"{host}/clip.mp4", [tracked])
    response = backend.http.post("/predict", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"] == []


def test_a_video_request_over_the_limits_answers_its_code(backend, host):
    region = _region([{"frame": 1, "x": 10, "y": 10, "width": 20, "height": 20}])
    payload = _predict(backend.url, f"{host}/missing.mp4", [region])
    response = backend.http.post("/predict", json=payload)
    assert response.status_code == 404 and response.json()["error"] == "image_not_found"
    payload["tasks"][0]["data"] = {}
    response = backend.http.post("/predict", json=payload)
    assert response.status_code == 422 and "data.video" in response.json()["detail"]


def test_a_1080p_request_answers_within_label_studios_budget(backend, tmp_path, grabcut_dir):
    """Label Studio waits 100 s for /predict; 4 s of 1080p video at 25 fps (the default
    TAPMASK_VIDEO_TRACK_SECONDS) with the flow tracker on CPU must come back well within it."""
    clip = build_clip(grabcut_dir, objects=1, frames=101, width=1920, height=1080, seed=3)
    truth = write_mp4(clip, tmp_path / "hd.mp4", FPS)
    start = percent_box(truth[0][0])
    region = _region([{"frame": 1, **start}])
    region["value"].update(framesCount=101, duration=101 / FPS)
    with file_host(tmp_path) as url:
        payload = _predict(backend.url, f"{url}/hd.mp4", [region])
        began = time.perf_counter()
        response = backend.http.post("/predict", json=payload, timeout=120)
        took = time.perf_counter() - began
    assert response.status_code == 200, response.text
    sequence = response.json()["results"][0]["result"][0]["value"]["sequence"]
    print(
        f"\n1080p: {len(sequence)} keyframes in {took:.1f} s ({len(sequence) / took:.1f} frames/s)"
    )
    assert len(sequence) == 101  # frames 1 … 101: the keyframe and 4 s after it
    assert took < 90
    ious = [box_iou(k, truth[k["frame"] - 1][0]) for k in sequence]
    assert np.mean(ious) >= 0.7


# --------------------------------------------------------------------------------------------
# The Redis worker pool serves the same tracking, configuration only


def test_a_redis_worker_tracks_the_same_region_as_the_in_process_tracker(
    clip_files, tmp_path, monkeypatch
):
    from fastapi.testclient import TestClient

    from backends.dispatch import dispatcher_from_env
    from backends.labelstudio.app import Settings, create_app
    from backends.labelstudio.client import ImageClient
    from backends.labelstudio.video import VideoTracking
    from backends.redis.dispatcher import RedisDispatcher
    from tests.support.fake_labelstudio import FakeLabelStudio
    from tests.support.processes import RedisServer, WorkerProcess

    folder, truth = clip_files
    fake_ls = FakeLabelStudio()
    fake_ls.files["/data/upload/3/clip.mp4"] = ((folder / "clip.mp4").read_bytes(), "video/mp4")
    region = _region([{"frame": 5, **percent_box(truth[4][1])}])
    payload = _predict("", "/data/upload/3/clip.mp4", [region])  # relative: Label Studio's own

    def answer(dispatcher) -> dict:
        settings = Settings(
            model="grabcut",
            tracker="flow",
            label_studio_url=fake_ls.url,
            api_key=fake_ls.legacy_token,
            video_track_seconds=1.0,
        )
        with TestClient(create_app(dispatcher, settings, ImageClient(timeout=5))) as client:
            response = client.post("/predict", json=payload)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["result"][0]

    try:
        local = answer(dispatcher_from_env(["grabcut", "flow"]))
        with RedisServer() as server:
            worker = WorkerProcess(server.url, ["flow"], name="tracker", log_dir=str(tmp_path))
            try:
                worker.wait_ready(server.client())
                monkeypatch.setenv("TAPMASK_REDIS_URL", server.url)
                dispatcher = dispatcher_from_env(["grabcut", "flow"])
                assert isinstance(dispatcher, RedisDispatcher)
                pooled = answer(dispatcher)
                dispatcher.close()
                frames_stored = len(list(server.client().scan_iter("tapmask:img:*")))
            finally:
                worker.stop(timeout=5)
            # Whole-project tracking (tapmask track) goes to the batch queue: a worker that
            # serves only batch queues answers it.
            batch_only = WorkerProcess(
                server.url,
                ["flow"],
                name="batch-tracker",
                env={"TAPMASK_WORKER_QUEUE_KINDS": "batch"},
                log_dir=str(tmp_path),
            )
            try:
                batch_only.wait_ready(server.client())
                dispatcher = dispatcher_from_env(["flow"])
                tracking = VideoTracking(dispatcher, ImageClient(), seconds=1.0, batch=True)
                video = tracking.frames.open((folder / "clip.mp4").read_bytes())
                parsed = parse_region(region, "region")
                batched = tracking.track_region(video, parsed, FPS).result
                tracking.close()
                dispatcher.close()
            finally:
                batch_only.stop(timeout=5)
    finally:
        fake_ls.close()
    assert pooled == local
    assert batched["value"]["sequence"] == local["value"]["sequence"]
    assert [k["frame"] for k in pooled["value"]["sequence"]] == list(range(5, 31))
    assert frames_stored == 26  # each frame sent once, as image bytes
    # Downloaded from Label Studio with its token (relative URL), twice: once per backend.
    downloads = [auth for path, auth in fake_ls.requests if path.endswith("clip.mp4")]
    assert downloads == [f"Token {fake_ls.legacy_token}"] * 2


def test_opening_a_video_task_downloads_its_video_before_the_first_request(clip_files):
    from fastapi.testclient import TestClient

    from backends.dispatch import dispatcher_from_env
    from backends.labelstudio.app import Settings, create_app
    from tests.support.fake_labelstudio import FakeLabelStudio

    folder, truth = clip_files
    fake_ls = FakeLabelStudio()
    fake_ls.files["/data/upload/3/clip.mp4"] = ((folder / "clip.mp4").read_bytes(), "video/mp4")
    settings = Settings(label_studio_url=fake_ls.url, api_key=fake_ls.legacy_token)
    settings.video_track_seconds = 0.4
    try:
        with TestClient(create_app(dispatcher_from_env(["grabcut", "flow"]), settings)) as client:
            opened = _predict("", "/data/upload/3/clip.mp4", [])
            opened["params"]["context"] = None  # task open: no regions yet
            assert client.post("/predict", json=opened).json() == {"results": []}
            tracking = client.app.state.service.video
            deadline = time.monotonic() + 30
            while not tracking._videos and time.monotonic() < deadline:
                time.sleep(0.05)  # downloaded and probed in the background
            assert [path for path, _ in fake_ls.requests] == ["/data/upload/3/clip.mp4"]
            region = _region([{"frame": 1, **percent_box(truth[0][0])}])
            response = client.post(
                "/predict", json=_predict("", "/data/upload/3/clip.mp4", [region])
            )
            assert response.status_code == 200, response.text
            assert len(response.json()["results"][0]["result"][0]["value"]["sequence"]) == 11
    finally:
        fake_ls.close()
    assert len(fake_ls.requests) == 1  # the click did not download the video again


def test_a_sam2_video_tracker_serves_video_regions_through_the_same_path(
    tmp_path, clip_files, host
):
    """A SAM 2.1 video tracker (a tiny random model through the real transformers loader) in
    place of the flow tracker: random weights track nothing useful, but the region comes back
    in Label Studio's shape, one keyframe a frame until the object is lost."""
    from fastapi.testclient import TestClient

    from backends.dispatch import LocalDispatcher
    from backends.engine import Engine
    from backends.labelstudio.app import Settings, create_app
    from backends.models import registry
    from tests.test_video_models import _make_sam2

    name = "sam2.1-hiera-tiny-video"
    engine = Engine()
    engine.load(["grabcut"])
    model_dir = _make_sam2(tmp_path / "sam2-video")
    engine.add_model(
        name, registry.create(name, checkpoint=model_dir, check_variant=False, device="cpu")
    )
    settings = Settings(tracker=name, video_track_seconds=0.2)
    _, truth = clip_files
    region = _region([{"frame": 1, **percent_box(truth[0][0])}])
    with TestClient(create_app(LocalDispatcher(engine), settings)) as client:
        response = client.post("/predict", json=_predict("", f"{host}/clip.mp4", [region]))
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"][0]["result"]
    sequence = answer["value"]["sequence"]
    assert answer["id"] == "vid_1" and sequence[0]["frame"] == 1
    assert [k["frame"] for k in sequence] == list(range(1, len(sequence) + 1))
    assert len(sequence) <= 6 and all(k["enabled"] for k in sequence[:-1])
    # Every frame went through the tracker: started on frame 1, stepped on the five after it.
    assert (engine.tracking.stats.started, engine.tracking.stats.stepped) == (1, 5)


def test_whole_project_tracking_follows_a_region_to_the_end_of_the_video(clip_files):
    from backends.dispatch import dispatcher_from_env
    from backends.labelstudio.client import ImageClient
    from backends.labelstudio.video import VideoTracking

    folder, truth = clip_files
    tracking = VideoTracking(dispatcher_from_env(["flow"]), ImageClient(), seconds=None)
    try:
        video = tracking.frames.open((folder / "clip.mp4").read_bytes())
        region = parse_region(_region([{"frame": 45, **percent_box(truth[44][1])}]), "r")
        tracked = tracking.track_region(video, region, FPS)
    finally:
        tracking.close()
    frames = [k["frame"] for k in tracked.result["value"]["sequence"]]
    assert frames == list(range(45, 61)) and tracked.frames == 16
