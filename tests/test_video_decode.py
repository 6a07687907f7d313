"""Video decoding for trackers: frames decoded once, cached, seekable, bounded."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from backends.errors import Unavailable, VideoError, VideoTooLarge
from backends.video.decode import VideoFrames

FRAMES = 60


def _numbered_clip(path: Path, fps: float = 25.0, size: tuple[int, int] = (160, 120)) -> Path:
    """A clip whose frame i shows a bar at x = 2i (so a frame says which one it is)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(FRAMES):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:, 2 * i : 2 * i + 4] = 255
        writer.write(frame)
    writer.release()
    return path


def _bar(data: bytes) -> int:
    """Where the bright bar is in a decoded JPEG frame: the frame's number."""
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return int(np.argmax(gray.mean(axis=0) > 128)) // 2


@pytest.fixture
def clip(tmp_path) -> bytes:
    return _numbered_clip(tmp_path / "clip.mp4").read_bytes()


def test_a_video_is_probed_and_its_frames_come_in_order_from_anywhere(clip):
    frames = VideoFrames()
    try:
        video = frames.open(clip)
        assert (video.width, video.height, video.fps, video.frame_count) == (160, 120, 25.0, 60)
        assert video.duration == pytest.approx(2.4)
        # A seek into the middle (no frame decoded yet) lands on the right frame.
        assert [(i, _bar(d)) for i, d in frames.frames(video, 37, 4)] == [
            (37, 37),
            (38, 38),
            (39, 39),
            (40, 40),
        ]
        assert [_bar(d) for _, d in frames.frames(video, 0, 3)] == [0, 1, 2]
        # Past the end: the frames there are, no error.
        assert [i for i, _ in frames.frames(video, 58, 10)] == [58, 59]
        assert frames.frame(video, 12) and _bar(frames.frame(video, 12)) == 12
    finally:
        frames.close()


def test_frames_are_decoded_once_then_served_from_the_cache(clip):
    frames = VideoFrames()
    try:
        video = frames.open(clip)
        first = list(frames.frames(video, 10, 20))
        misses = frames.cache.stats.misses
        # A run overlapping the cached one: cached frames cost nothing, the rest are decoded
        # after a fresh seek (the capture is not left behind by the cached frames).
        again = list(frames.frames(video, 20, 20))
        assert again[:10] == first[10:]
        assert [_bar(d) for _, d in again] == list(range(20, 40))
        assert frames.cache.stats.misses == misses + 10
        assert frames.open(clip) == video  # the same bytes are not written or probed again
    finally:
        frames.close()


def test_not_a_video_and_oversized_frames_are_refused_before_decoding(clip, monkeypatch):
    frames = VideoFrames()
    try:
        with pytest.raises(VideoError) as bad:
            frames.open(b"GIF89a not a video at all" * 10)
        assert bad.value.status == 400 and bad.value.code == "bad_video"
        monkeypatch.setenv("TAPMASK_MAX_VIDEO_PIXELS", str(160 * 120 - 1))
        with pytest.raises(VideoTooLarge) as large:
            frames.open(clip)
        assert large.value.status == 413 and "TAPMASK_MAX_VIDEO_PIXELS" in str(large.value)
    finally:
        frames.close()


def test_the_decoder_keeps_a_bounded_number_of_videos_on_disk(tmp_path):
    frames = VideoFrames(max_files=2)
    try:
        videos = [
            frames.open(_numbered_clip(tmp_path / f"{fps}.mp4", fps=fps).read_bytes())
            for fps in (10.0, 20.0, 30.0)
        ]
        assert frames.known(videos[0].sha256) is None
        assert frames.known(videos[2].sha256) == videos[2]
        assert len(list(Path(frames._dir).iterdir())) == 2
        frames.cache.clear()
        with pytest.raises(VideoError):  # evicted: its frames must be opened again
            list(frames.frames(videos[0], 0, 1))
    finally:
        frames.close()
    assert not Path(frames._dir).exists()


def test_the_same_video_opened_at_once_by_several_requests_is_read_whole(clip):
    from concurrent.futures import ThreadPoolExecutor

    frames = VideoFrames()
    try:
        with ThreadPoolExecutor(4) as pool:
            videos = list(pool.map(frames.open, [clip] * 8))
        assert len(set(videos)) == 1 and videos[0].frame_count == FRAMES
        assert [p.name for p in Path(frames._dir).iterdir()] == [videos[0].sha256]
    finally:
        frames.close()


def test_no_writable_temporary_folder_refuses_videos_but_not_the_server(
    clip, monkeypatch, tmp_path
):
    """A read-only filesystem (Kubernetes' readOnlyRootFilesystem, our image run read-only) must
    not stop a server that never sees a video; a video then gets a clear 503."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    frames = VideoFrames()  # nothing is created at start-up
    with pytest.raises(Unavailable) as info:
        frames.open(clip)
    assert info.value.status == 503 and "TMPDIR" in str(info.value)
    frames.close()
