"""Label Studio video rows: getting a request's frames ready for the tracker.

Upstream's ``segment_anything_2_video`` backend splits the video into JPEG files on every request
(decode from frame 0, write each frame); tapmask decodes a video once and keeps its frames as JPEG
bytes by (video sha256, frame). Both sides here prepare the frames of one request, 4 s of a
1080p 25 fps MP4 starting 2 s in: the first request on a video (a seek, then decoding), and every
later one (the cache).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from backends.benchmarks import BenchRow, median_time
from backends.video.decode import VideoFrames

WIDTH, HEIGHT, FPS = 1920, 1080, 25
START, COUNT = 50, 100  # frames 2 s … 6 s of the clip


def _clip(path: Path, frames: int = START + COUNT) -> bytes:
    """A panning smooth texture with a moving square (compresses like real footage)."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(
        rng.integers(0, 255, (HEIGHT, WIDTH + 2 * frames, 3), dtype=np.uint8), (0, 0), 4
    )
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    for i in range(frames):
        frame = np.ascontiguousarray(texture[:, 2 * i : 2 * i + WIDTH])
        frame[400:700, 300 + 8 * i : 600 + 8 * i] = (40, 200, 90)
        writer.write(frame)
    writer.release()
    return path.read_bytes()


def _upstream(path: Path, folder: str) -> None:
    """What ``segment_anything_2_video`` does per request: frames from 0 to the last wanted,
    each written as a JPEG file."""
    capture = cv2.VideoCapture(str(path))
    for index in range(START + COUNT):
        ok, frame = capture.read()
        if not ok:
            break
        cv2.imwrite(os.path.join(folder, f"{index:05d}.jpg"), frame)
    capture.release()


def run() -> list[BenchRow]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        data = _clip(path)
        frames_dir = Path(folder) / "frames"
        frames_dir.mkdir()
        baseline = median_time(lambda: _upstream(path, str(frames_dir)), repeat=3, warmup=0)

        def first_request() -> None:
            frames = VideoFrames()
            try:
                video = frames.open(data)
                for _ in frames.frames(video, START, COUNT):
                    pass
            finally:
                frames.close()

        cold = median_time(first_request, repeat=3, warmup=0)
        warm_frames = VideoFrames()
        try:
            video = warm_frames.open(data)
            for _ in warm_frames.frames(video, START, COUNT):
                pass
            warm = median_time(
                lambda: [d for _, d in warm_frames.frames(warm_frames.open(data), START, COUNT)],
                repeat=5,
            )
        finally:
            warm_frames.close()
    note = (
        f"{COUNT} frames of a {WIDTH}x{HEIGHT} {FPS} fps MP4 from frame {START}: VideoFrames vs "
        "decoding from frame 0 and writing JPEG files (segment_anything_2_video, per request)"
    )
    return [
        BenchRow(
            name="ls_video_frames_first_request_1080p",
            ours=cold,
            baseline=baseline,
            target=">= 1x (one seek, no files)",
            passed=cold <= baseline,
            note=note,
        ),
        BenchRow(
            name="ls_video_frames_later_requests_1080p",
            ours=warm,
            baseline=baseline,
            target=">= 20x faster (decoded once)",
            passed=baseline / warm >= 20,
            note="the same frames asked for again (the video's sha256 and the frame cache)",
        ),
    ]
