"""Tracking Label Studio video regions forward (no HTTP here: ``service.py`` routes to it).

An annotator's ``videorectangle`` region ends in a keyframe box; ``VideoTracking`` follows that
box through the next frames with a video tracker (``Dispatcher.track``, so a Redis worker pool
serves it unchanged) and answers the same region with one keyframe a frame after it:

1. the task's video is downloaded once (``ImageClient`` with the video limits) and decoded once
   (``backends.video.decode.VideoFrames``: frames cached as JPEG by video sha256 and index);
2. Label Studio's frame numbers map to decoded frames through the task's framerate
   (``videoregions.frame_index``);
3. the tracker starts from the keyframe box on its frame and steps frame by frame, for
   ``TAPMASK_VIDEO_TRACK_SECONDS`` of video (at most ``TAPMASK_MAX_TRACK_FRAMES``), the end
   of the video, or ``TAPMASK_VIDEO_TRACK_DEADLINE_S`` after the request came in (Label Studio
   waits 100 s), whichever comes first: what was tracked by then is answered;
4. where the tracker loses the object the last keyframe before gets ``enabled: false`` (Label
   Studio hides the region after it); where it finds it again a keyframe starts it anew.

``tapmask track`` (``backends.labelstudio.track``) uses the same ``track_region``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from backends.dispatch import Dispatcher
from backends.errors import InvalidRequest, LabelConfigError, VideoTooLarge
from backends.labelstudio.client import Credentials, FetchLimits, ImageClient
from backends.labelstudio.labelconfig import LabelConfig, VideoTag
from backends.labelstudio.videoregions import (
    VideoRegion,
    frame_index,
    framerate,
    frames_count,
    keyframe,
    region_result,
)
from backends.prompts import Box, TrackAnswer, TrackTarget
from backends.settings import MAX_TRACK_FRAMES, MAX_VIDEO_MB, VIDEO_DOWNLOAD_DEADLINE_S, max_bytes
from backends.video.decode import Video, VideoFrames

log = logging.getLogger("tapmask.labelstudio")


@dataclass
class Tracked:
    """One region followed: its result for Label Studio and what it cost."""

    result: dict[str, Any]
    frames: int  # frames the tracker ran on (the start frame included)
    lost: int  # of which the object was lost on
    seconds: float


class VideoTracking:
    """Label Studio video regions → tracked regions, over a dispatcher and an image client."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        client: ImageClient,
        frames: VideoFrames | None = None,
        *,
        tracker: str = "flow",
        seconds: float | None = 4.0,
        deadline_s: float = 60.0,
        batch: bool = False,
    ) -> None:
        self.dispatcher = dispatcher
        self.client = client
        self.frames = frames or VideoFrames()
        self.tracker = tracker
        self.seconds = seconds  # None: to the end of the video (TAPMASK_MAX_TRACK_FRAMES)
        self.batch = batch  # whole-project work: interactive requests overtake it
        self.deadline_s = deadline_s
        self._videos: OrderedDict[str, str] = OrderedDict()  # URL → sha256 of its bytes
        self._lock = threading.Lock()

    def close(self) -> None:
        self.frames.close()

    # -- Label Studio's interactive request ------------------------------------------------
    def predict(
        self,
        task: dict[str, Any],
        config: LabelConfig,
        regions: list[VideoRegion],
        creds: Credentials,
        *,
        model_version: str,
    ) -> dict[str, Any]:
        """``/predict`` with video regions as context: each region the annotator has just
        keyframed, tracked on (see ``VideoRegion.start``)."""
        started = time.monotonic()
        deadline = started + self.deadline_s
        tracked = [
            t
            for t in self.track_task(task, config, regions, creds, deadline=deadline)
            if t is not None
        ]
        if not tracked:
            # Normal, not an error: deleting a region or relabelling a tracked one sends the
            # label's regions again. Label Studio shows nothing for an empty result.
            log.info(
                "task %s: no video region to track (each ends in a tracked or an ended "
                "keyframe; add a keyframe after the track)",
                task.get("id"),
            )
            return {"results": [{"result": [], "score": 0.0, "model_version": model_version}]}
        results = [t.result for t in tracked]
        score = sum(r["score"] for r in results) / len(results)
        log.info(
            "task %s: %d video region(s), %d frame(s) tracked (%d lost) in %.1f s",
            task.get("id"),
            len(results),
            sum(t.frames for t in tracked),
            sum(t.lost for t in tracked),
            time.monotonic() - started,
        )
        return {"results": [{"result": results, "score": score, "model_version": model_version}]}

    # -- shared with ``tapmask track`` -----------------------------------------------------
    def track_task(
        self,
        task: dict[str, Any],
        config: LabelConfig,
        regions: list[VideoRegion],
        creds: Credentials,
        *,
        deadline: float | None = None,
    ) -> list[Tracked | None]:
        """Each region tracked from its start keyframe (None: nothing to track)."""
        plans = [(region, self._tag(config, region)) for region in regions]
        todo = [(region, tag) for region, tag in plans if region.start() is not None]
        if not todo:
            return [None] * len(regions)
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        by_id: dict[str, Tracked] = {}
        for region, tag in todo:
            video = self.video(self._video_url(task, tag.key), creds)
            ls_fps = framerate(tag, data)
            by_id[region.id] = self.track_region(video, region, ls_fps, deadline=deadline)
        return [by_id.get(region.id) for region in regions]

    def video(self, url: str, creds: Credentials) -> Video:
        """The task's video, downloaded and probed once (then known by its URL)."""
        with self._lock:
            sha = self._videos.get(url)
        known = self.frames.known(sha) if sha else None
        if known is not None:
            return known
        limits = FetchLimits(
            max_bytes(MAX_VIDEO_MB),
            float(VIDEO_DOWNLOAD_DEADLINE_S),
            "video",
            VideoTooLarge,
            "TAPMASK_VIDEO_DOWNLOAD_DEADLINE_S",
        )
        video = self.frames.open(self.client.fetch(url, creds, limits=limits))
        with self._lock:
            self._videos[url] = video.sha256
            while len(self._videos) > 64:
                self._videos.popitem(last=False)
        return video

    def track_region(
        self,
        video: Video,
        region: VideoRegion,
        ls_fps: float,
        *,
        deadline: float | None = None,
        max_frames: int | None = None,
    ) -> Tracked:
        """Follow ``region`` from its start keyframe (see the module docstring)."""
        started = time.monotonic()
        start = region.start()
        if start is None:
            raise InvalidRequest(f"region {region.id} has no keyframe to track from")
        total = self._frames_count(region, video, ls_fps)
        if max_frames is not None:
            wanted = max_frames
        elif self.seconds is not None:
            wanted = round(self.seconds * ls_fps)
        else:
            wanted = total - start.frame
        limit = int(MAX_TRACK_FRAMES)
        if wanted > limit:
            log.info("tracking %d frames at most (TAPMASK_MAX_TRACK_FRAMES), not %d", limit, wanted)
        last_frame = min(start.frame + min(wanted, limit), total)
        sequence = [dict(raw) for raw in region.raw_sequence if raw.get("frame", 0) <= start.frame]
        for item in sequence:
            item["time"] = item["frame"] / ls_fps
        width, height = video.width, video.height
        box: Box = start.box(width, height)
        frames = self._decoded(video, start.frame, last_frame, ls_fps)
        first = next(frames, None)
        if first is None:
            raise InvalidRequest(
                f"region {region.id} starts at frame {start.frame}, after the video's last "
                f"decodable frame ({video.frame_count} at {video.fps:g} fps)"
            )
        index, image = first
        answer = self._track(image, TrackTarget(box=box))
        scores, ran, lost = [answer.score], 1, 0
        visible = True
        previous_index = index
        for frame in range(start.frame + 1, last_frame + 1):
            if deadline is not None and time.monotonic() > deadline:
                log.info("region %s: tracking deadline reached at frame %d", region.id, frame)
                break
            index = frame_index(frame, ls_fps, video.fps, video.frame_count)
            if index != previous_index:
                try:
                    index, image = _advance(frames, index)
                except StopIteration:  # the video ends before Label Studio's frame count
                    break
                target = TrackTarget(box=box, state=answer.state)
                answer = self._track(image, target)
                previous_index, ran = index, ran + 1
            if answer.lost or answer.box is None:
                lost += 1
                if visible:  # the last keyframe shown ends the object's life (until found)
                    sequence[-1]["enabled"] = False
                    visible = False
                continue
            box, visible = answer.box, True
            scores.append(answer.score)
            sequence.append(keyframe(frame, box, width, height, ls_fps))
        result = region_result(
            region,
            sequence,
            frames_count=total,
            duration=self._duration(region, video),
            score=sum(scores) / len(scores),
        )
        return Tracked(result, ran, lost, time.monotonic() - started)

    # -- internals ----------------------------------------------------------------------------
    def _track(self, image: bytes, target: TrackTarget) -> TrackAnswer:
        if self.batch:
            answers = self.dispatcher.track(self.tracker, image, [target], batch=True)
        else:
            answers = self.dispatcher.track(self.tracker, image, [target])
        return answers[0]

    def _decoded(
        self, video: Video, first: int, last: int, ls_fps: float
    ) -> Iterator[tuple[int, bytes]]:
        start = frame_index(first, ls_fps, video.fps, video.frame_count)
        stop = frame_index(last, ls_fps, video.fps, video.frame_count)
        return self.frames.frames(video, start, stop - start + 1)

    @staticmethod
    def _frames_count(region: VideoRegion, video: Video, ls_fps: float) -> int:
        declared = region.value.get("framesCount")
        if isinstance(declared, int) and not isinstance(declared, bool) and 0 < declared < 10**9:
            return declared
        return frames_count(video.duration, ls_fps)

    @staticmethod
    def _duration(region: VideoRegion, video: Video) -> float:
        declared = region.value.get("duration")
        number = isinstance(declared, (int, float)) and not isinstance(declared, bool)
        if number and math.isfinite(declared) and declared > 0:
            return float(declared)
        return video.duration

    @staticmethod
    def _tag(config: LabelConfig, region: VideoRegion) -> VideoTag:
        tag = config.videos.get(region.to_name)
        if tag is None:
            raise LabelConfigError(
                f"region {region.id} is on {region.to_name!r}, which is no <Video> of the "
                f"label_config (videos: {sorted(config.videos)})"
            )
        if not tag.key:
            raise LabelConfigError(f"<Video name={tag.name!r}> has no value=$field")
        return tag

    @staticmethod
    def _video_url(task: dict[str, Any], key: str) -> str:
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
            raise InvalidRequest(f"task {task.get('id')} has no video URL in data.{key}")
        return data[key]


def _advance(frames: Iterator[tuple[int, bytes]], index: int) -> tuple[int, bytes]:
    """The decoded frame ``index`` from the run (frames before it are skipped)."""
    while True:
        got, image = next(frames)
        if got >= index:
            return got, image
