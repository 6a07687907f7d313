"""Video frames as image bytes: each video decoded once, its frames cached.

A tracker works on one frame at a time, and ``Dispatcher.track`` takes a frame as image file
bytes (so a Redis worker gets it like any other image). ``VideoFrames`` turns a video's bytes
into those frames:

* ``open(data)`` writes the video to a private temporary file (OpenCV's decoder reads files),
  keyed by its sha256, and reads its size, framerate and frame count from the container; frames
  over ``TAPMASK_MAX_VIDEO_PIXELS`` are refused before any frame is decoded;
* ``frames(video, start, count)`` yields ``(index, JPEG bytes)`` from frame ``start`` on: frames
  already decoded come from a bytes-bounded LRU keyed by (video sha256, frame index); a run of
  missing frames is decoded in one pass (one seek, then sequential reads) and cached.

Frames are cached encoded (JPEG, quality 95: about 0.3 MB for a 1080p frame instead of 6 MB of
pixels), which is also the form the dispatcher sends. OpenCV's FFmpeg build reads every common
container and codec (MP4/H.264, WebM/VP8/VP9, MOV, AVI); PyAV is not needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from backends.cache import LRUCache
from backends.errors import Unavailable, VideoError, VideoTooLarge
from backends.settings import MAX_VIDEO_PIXELS

log = logging.getLogger(__name__)

JPEG_QUALITY = 95


@dataclass(frozen=True)
class Video:
    """A video ``VideoFrames`` holds: its key, frame size, container framerate and length."""

    sha256: str
    width: int
    height: int
    fps: float
    frame_count: int

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps


def encode_frame(bgr: np.ndarray) -> bytes:
    """A decoded BGR frame as JPEG bytes (what ``Dispatcher.track`` is sent)."""
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise VideoError("a decoded video frame could not be encoded as JPEG")
    return buffer.tobytes()


class VideoFrames:
    """Frames of videos by (sha256, index), decoded once (see the module docstring).

    ``cache_bytes`` bounds the encoded frames kept; ``max_files`` the videos kept on disk
    (the least recently opened is deleted first).
    """

    def __init__(self, cache_bytes: int = 512 * 2**20, max_files: int = 4) -> None:
        self.cache: LRUCache[bytes] = LRUCache(cache_bytes, "video-frames")
        self._dir: str | None = None  # made at the first video: a server that never sees one
        # must start on a read-only filesystem too (Kubernetes' readOnlyRootFilesystem)
        self._files: OrderedDict[str, tuple[str, Video]] = OrderedDict()
        self._max_files = max_files
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _directory(self) -> str:
        with self._lock:
            if self._dir is None:
                try:
                    self._dir = tempfile.mkdtemp(prefix="tapmask-video-")
                except OSError as exc:
                    raise Unavailable(
                        "no writable temporary directory for decoding videos "
                        f"(set TMPDIR to a writable folder): {exc}"
                    ) from None
            return self._dir

    # -- opening ---------------------------------------------------------------------------
    def open(self, data: bytes) -> Video:
        """The video in ``data``, probed (size, framerate, length) and kept on disk."""
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            known = self._files.get(key)
            if known is not None:
                self._files.move_to_end(key)
                return known[1]
        directory = self._directory()
        path = os.path.join(directory, key)
        # Written under a private name, then renamed: a request and a task-open prefetch may
        # open the same video at once, and neither may read the other's half-written file.
        handle, partial = tempfile.mkstemp(dir=directory, suffix=".part")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        try:
            video = _probe(partial, key)
        except Exception:
            os.unlink(partial)
            raise
        os.replace(partial, path)
        with self._lock:
            self._files[key] = (path, video)
            while len(self._files) > self._max_files:
                old, (old_path, _) = self._files.popitem(last=False)
                if old != key:
                    _unlink(old_path)
        return video

    def known(self, sha256: str) -> Video | None:
        with self._lock:
            entry = self._files.get(sha256)
        return entry[1] if entry else None

    # -- frames ----------------------------------------------------------------------------
    def frames(self, video: Video, start: int, count: int) -> Iterator[tuple[int, bytes]]:
        """``(index, JPEG bytes)`` for frames ``start`` … ``start + count - 1`` (fewer at the end
        of the video). Cached frames cost nothing; missing ones are decoded in one pass."""
        stop = min(start + count, video.frame_count) if video.frame_count else start + count
        index = max(0, start)
        capture: cv2.VideoCapture | None = None
        try:
            while index < stop:
                cached = self.cache.get((video.sha256, index))
                if cached is not None:
                    if capture is not None:  # its position is now behind: seek again later
                        capture.release()
                        capture = None
                    yield index, cached
                    index += 1
                    continue
                if capture is None:
                    capture = self._capture(video, index)
                ok, bgr = capture.read()
                if not ok:  # the container promised more frames than it holds
                    log.info("video %s: no frame %d (end of stream)", video.sha256[:12], index)
                    return
                data = encode_frame(bgr)
                self.cache.put((video.sha256, index), data, len(data))
                yield index, data
                index += 1
        finally:
            if capture is not None:
                capture.release()

    def frame(self, video: Video, index: int) -> bytes:
        for _, data in self.frames(video, index, 1):
            return data
        raise VideoError(f"video has no frame {index} (it has {video.frame_count})")

    def _capture(self, video: Video, index: int) -> cv2.VideoCapture:
        with self._lock:
            entry = self._files.get(video.sha256)
        if entry is None:
            raise VideoError("video was evicted from the decoder's files: open it again")
        capture = cv2.VideoCapture(entry[0], cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise VideoError("the video can no longer be opened")
        if index:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        return capture

    def stats(self) -> dict[str, float]:
        return vars(self.cache.stats)


def _probe(path: str, key: str) -> Video:
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise VideoError(
                "the task's video cannot be decoded (not a video, or an unknown codec)"
            )
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if width <= 0 or height <= 0:
            raise VideoError("the task's video has no readable frame size")
        limit = int(MAX_VIDEO_PIXELS)
        if width * height > limit:
            raise VideoTooLarge(
                f"video frames are {width}×{height} = {width * height} pixels, over the "
                f"{limit}-pixel limit (TAPMASK_MAX_VIDEO_PIXELS)"
            )
        if not (0 < fps < 1000):
            log.info("video %s: container framerate %r unusable, taking 25", key[:12], fps)
            fps = 25.0
        return Video(key, width, height, fps, max(count, 0))
    finally:
        capture.release()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
