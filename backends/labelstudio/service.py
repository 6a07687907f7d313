"""What the Label Studio backend does with a request, as a plain class (no HTTP here).

``LabelStudioService.predict(body)`` is ``POST /predict``: parse the payload → dispatch each
object to the model → format brush/polygon regions. Without context ("Retrieve predictions", task
open) it prefetches, or pre-annotates the tasks for projects that opt in (``retrieve.py``).
``setup(body)`` remembers the host, token and extra params Label Studio pushes per project.
``app.py`` only routes HTTP to these methods, so tests can call them directly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydantic import ValidationError

from backends import __version__, images
from backends.dispatch import Dispatcher
from backends.errors import EmptyMask, InvalidRequest
from backends.labelstudio.client import Credentials, ImageClient, check_url
from backends.labelstudio.frames import frame_for
from backends.labelstudio.labelconfig import VIDEO_TYPES, Control, LabelConfig
from backends.labelstudio.preannotation import MODES
from backends.labelstudio.predict import (
    ObjectRequest,
    PredictRequest,
    answer_ids,
    objects_from_context,
    regions,
    to_prompt,
)
from backends.labelstudio.refine import ImageGeometry, region_to_refine
from backends.labelstudio.retrieve import Retriever, check_extra_params, retrieve_plan
from backends.labelstudio.video import VideoTracking
from backends.labelstudio.videoregions import regions_from_context
from backends.preannotate.settings import detector_name
from backends.prompts import Prompt
from backends.settings import MAX_REQUEST_MB, PREFETCH_QUEUE, max_bytes, model_name
from backends.video.decode import VideoFrames

log = logging.getLogger("tapmask.labelstudio")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _refine_from_env() -> bool:
    value = os.environ.get("TAPMASK_REFINE", "on").strip().lower()
    if value in ("on", "1", "true", "yes", ""):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"TAPMASK_REFINE={value!r}: expected on or off")


def _refine_distance_from_env() -> float:
    raw = os.environ.get("TAPMASK_REFINE_DISTANCE", "").strip() or "2"
    try:
        percent = float(raw)
    except ValueError:
        raise ValueError(f"TAPMASK_REFINE_DISTANCE={raw!r}: expected a percentage") from None
    if not 0 <= percent <= 100:
        raise ValueError(f"TAPMASK_REFINE_DISTANCE={raw!r}: expected 0 to 100 (percent)")
    return percent / 100.0


@dataclass
class Settings:
    model: str = field(default_factory=model_name)
    label_studio_url: str | None = field(default_factory=lambda: _env("LABEL_STUDIO_URL"))
    api_key: str | None = field(default_factory=lambda: _env("LABEL_STUDIO_API_KEY"))
    basic_auth_user: str | None = field(default_factory=lambda: _env("BASIC_AUTH_USER"))
    basic_auth_pass: str | None = field(default_factory=lambda: _env("BASIC_AUTH_PASS"))
    # Label Studio sends every annotation and prediction of a task (with their RLEs) along.
    max_request_bytes: int = field(default_factory=lambda: max_bytes(MAX_REQUEST_MB))
    prefetch_threads: int = 2
    prefetch_queue: int = field(default_factory=lambda: int(PREFETCH_QUEUE))
    polygon_tolerance: float = 1.0
    # Video regions (videorectangle): the tracker, how far one request follows an object, and
    # when to answer with what is tracked so far (Label Studio waits 100 s for /predict).
    tracker: str = field(default_factory=lambda: _env("TAPMASK_TRACKER") or "flow")
    video_track_seconds: float = field(
        default_factory=lambda: float(_env("TAPMASK_VIDEO_TRACK_SECONDS") or 4.0)
    )
    video_track_deadline_s: float = field(
        default_factory=lambda: float(_env("TAPMASK_VIDEO_TRACK_DEADLINE_S") or 60.0)
    )
    video_frame_cache_mb: float = field(
        default_factory=lambda: float(_env("TAPMASK_VIDEO_FRAME_CACHE_MB") or 512.0)
    )
    # A click on an existing brush/polygon region of its label refines it (labelstudio/refine.py)
    refine: bool = field(default_factory=_refine_from_env)
    # How far outside a region the first click may land and still refine it (fraction of the
    # image's longer side; the environment gives it in percent).
    refine_distance: float = field(default_factory=_refine_distance_from_env)
    # "Retrieve predictions" with masks for every project ("text" / "boxes"; extra params opt
    # one project in), the text mode's detector, the region format, tasks at a time.
    retrieve: str | None = field(default_factory=lambda: _env("TAPMASK_RETRIEVE"))
    detector: str = field(default_factory=detector_name)
    retrieve_format: str = field(default_factory=lambda: _env("TAPMASK_RETRIEVE_FORMAT") or "brush")
    retrieve_concurrency: int = 2

    @property
    def model_version(self) -> str:
        return f"tapmask-{__version__}-{self.model}"


class Projects:
    """Per-project Label Studio address and token, as pushed by ``/setup`` (env as fallback)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._by_project: dict[str, Credentials] = {}
        self._extra: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def remember(
        self,
        project: str | None,
        hostname: str | None,
        token: str | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if project is None:
            return
        with self._lock:
            self._by_project[project] = Credentials(hostname or None, token or None)
            self._extra[project] = dict(extra or {})

    def extra_params(self, project: str | None) -> dict[str, Any]:
        """The project's checked ML backend extra params (``retrieve``, ``prompts``, ``format``)."""
        with self._lock:
            return dict(self._extra.get(project or "", {}))

    def credentials(self, project: str | None) -> Credentials:
        env = Credentials(self._settings.label_studio_url, self._settings.api_key)
        with self._lock:
            pushed = self._by_project.get(project or "")
        if pushed is None:
            return env
        # The environment wins: /setup's hostname defaults to localhost, wrong inside Docker.
        return Credentials(env.url or pushed.url, env.token or pushed.token)


def _is_video(result: Any) -> bool:
    """Whether the smart regions are video regions (Label Studio never mixes types)."""
    return isinstance(result, list) and any(
        isinstance(item, dict) and item.get("type") in VIDEO_TYPES for item in result
    )


def project_id(project: Any) -> str | None:
    """``"12.1795267061"`` → ``"12"`` (Label Studio appends the project's creation time)."""
    return None if project is None else str(project).split(".")[0]


class LabelStudioService:
    """The backend's request logic over a ``Dispatcher`` and an ``ImageClient``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: Settings | None = None,
        image_client: ImageClient | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings or Settings()
        self.client = image_client or ImageClient()
        self.projects = Projects(self.settings)
        # Task-open prefetches download images in the background; the dispatchers de-duplicate.
        self._prefetcher = ThreadPoolExecutor(
            self.settings.prefetch_threads, thread_name_prefix="ls-prefetch"
        )
        self._prefetches = threading.BoundedSemaphore(self.settings.prefetch_queue)
        if self.settings.retrieve not in (None, *MODES):
            raise InvalidRequest(f"TAPMASK_RETRIEVE must be one of {MODES}")
        self.retriever = Retriever(dispatcher, self.settings.retrieve_concurrency)
        self.video = VideoTracking(
            dispatcher,
            self.client,
            VideoFrames(int(self.settings.video_frame_cache_mb * 2**20)),
            tracker=self.settings.tracker,
            seconds=self.settings.video_track_seconds,
            deadline_s=self.settings.video_track_deadline_s,
        )

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self.retriever.close()
        self.video.close()

    def stats(self) -> dict[str, dict[str, float]]:
        """Cache counters for ``/metrics``: the dispatcher's and the image downloads'."""
        stats = dict(self.dispatcher.stats())
        stats["image-downloads"] = vars(self.client.cache.stats)
        stats["video-frames"] = self.video.frames.stats()
        return stats

    # -- endpoints ---------------------------------------------------------------------------
    def setup(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("/setup expects a JSON object")
        hostname, token = body.get("hostname"), body.get("access_token")
        if hostname is not None and not isinstance(hostname, str):
            raise InvalidRequest("/setup: hostname must be a string")
        if hostname:
            check_url(hostname)
            if not hostname.lower().startswith(("http://", "https://")):
                raise InvalidRequest("/setup: hostname must be an http(s) address")
        if token is not None and not (
            isinstance(token, str) and token.isascii() and token.isprintable()
        ):
            raise InvalidRequest("/setup: access_token must be printable ASCII")
        project = body.get("project")
        if project is not None and not isinstance(project, (str, int)):
            raise InvalidRequest("/setup: project must be a string")
        extra = check_extra_params(body.get("extra_params"))
        self.projects.remember(project_id(project), hostname, token, extra)
        return {"model_version": self.settings.model_version}

    def predict(self, payload: Any) -> dict[str, Any]:
        request = self._parse(payload)
        config = LabelConfig.parse(request.label_config)
        creds = self.projects.credentials(request.project_id)
        context = request.context
        if not context or not context.get("result"):
            settings = self.settings
            plan = retrieve_plan(
                settings.retrieve,
                self.projects.extra_params(request.project_id),
                settings.model,
                settings.detector,
                settings.retrieve_format,
            )
            if plan is not None:
                fetch = partial(self.client.fetch, creds=creds)
                return {"results": self.retriever.results(plan, config, request.tasks, fetch)}
            self._prefetch_tasks(request, config, creds)
            # Nothing to show yet: an empty list stores no junk prediction in Label Studio.
            return {"results": []}
        task = request.tasks[0]
        if _is_video(context["result"]):
            regions = regions_from_context(context["result"])
            return self.video.predict(
                task, config, regions, creds, model_version=self.settings.model_version
            )
        # Everything the request controls is checked before the first download: counts and
        # declared sizes (objects_from_context), image URLs and labels (_plan).
        planned = [self._plan(task, obj, config, creds) for obj in objects_from_context(context)]
        results: list[dict[str, Any]] = []
        empty: list[EmptyMask] = []
        for obj, url, outputs in planned:
            try:
                results.extend(self._segment_object(task, obj, url, outputs, creds))
            except EmptyMask as exc:  # one box over nothing must not lose the other objects
                empty.append(exc)
        if not results:
            raise empty[0] if empty else EmptyMask("no region to return")
        score = max(r["score"] for r in results)
        return {
            "results": [
                {"result": results, "score": score, "model_version": self.settings.model_version}
            ]
        }

    # -- internals -----------------------------------------------------------------------------
    @staticmethod
    def _parse(payload: Any) -> PredictRequest:
        try:
            return PredictRequest.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidRequest(f"invalid /predict request: {problems}") from exc

    @staticmethod
    def _task_image(task: dict[str, Any], config: LabelConfig, to_name: str) -> str:
        key = config.image_key(to_name)
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
            raise InvalidRequest(f"task {task.get('id')} has no image URL in data.{key}")
        return data[key]

    def _plan(
        self, task: dict[str, Any], obj: ObjectRequest, config: LabelConfig, creds: Credentials
    ) -> tuple[ObjectRequest, str, list[tuple[Control, str]]]:
        """An object's image URL (checked, not fetched) and output controls, or a 4xx."""
        url = self._task_image(task, config, obj.to_name)
        if url[:5].lower() != "data:":
            self.client.resolve(url, creds)
        return obj, url, config.outputs_for(obj.to_name, obj.label)

    def _segment_object(
        self,
        task: dict[str, Any],
        obj: ObjectRequest,
        url: str,
        outputs: list[tuple[Control, str]],
        creds: Credentials,
    ) -> list[dict[str, Any]]:
        settings = self.settings
        started = time.perf_counter()
        image = self.client.fetch(url, creds)
        fetched = time.perf_counter()
        *_, orientation = images.header(image)
        height, width = images.size(image)
        frame = frame_for(obj.original_width, obj.original_height, height, width, orientation)
        if frame.kind != "same":
            log.info(
                "task %s: Label Studio declares %dx%d for a %dx%d image (%s frame)",
                task.get("id"),
                frame.width,
                frame.height,
                width,
                height,
                frame.kind,
            )
        geometry = ImageGeometry(height, width, orientation)
        prompt = self._with_region_to_refine(task, obj, outputs, to_prompt(obj, frame), geometry)
        seg = self.dispatcher.segment(settings.model, image, prompt)
        if seg.area == 0:
            raise EmptyMask(f"{settings.model} found no object for these clicks")
        out = regions(
            seg,
            obj,
            outputs,
            frame,
            task_id=task.get("id"),
            prompt=prompt,
            polygon_tolerance=settings.polygon_tolerance,
        )
        log.info(
            "task %s: %d click(s)%s -> %d px, score %.3f (fetch %.0f ms, segment %.0f ms)",
            task.get("id"),
            len(prompt.clicks),
            " + box" if prompt.box else "",
            seg.area,
            seg.score,
            (fetched - started) * 1000,
            (time.perf_counter() - fetched) * 1000,
        )
        return out

    def _with_region_to_refine(
        self,
        task: dict[str, Any],
        obj: ObjectRequest,
        outputs: list[tuple[Control, str]],
        prompt: Prompt,
        image: ImageGeometry,
    ) -> Prompt:
        """Keypoints on an existing brush/polygon region of their label refine it: the region
        becomes the prompt's previous mask (``backends/labelstudio/refine.py``). A smart rectangle
        always starts a new object."""
        if not self.settings.refine or prompt.box is not None or not prompt.clicks:
            return prompt
        existing = region_to_refine(
            task,
            obj.to_name,
            outputs,
            prompt.clicks[0],
            image,
            self.settings.refine_distance,
            skip_ids=answer_ids(task.get("id"), outputs, prompt),
        )
        if existing is None:
            return prompt
        log.info(
            "task %s: refining %s region %s (%.0f px from the first click)",
            task.get("id"),
            existing.source,
            existing.region_id,
            existing.distance,
        )
        return Prompt(prompt.clicks, prompt.box, existing.mask)

    def _prefetch_tasks(
        self, request: PredictRequest, config: LabelConfig, creds: Credentials
    ) -> None:
        for task in request.tasks:
            # Images: their embeddings; videos: the download (decoded when first tracked).
            keys = [(key, False) for key in config.images.values()]
            keys += [(tag.key, True) for tag in config.videos.values() if tag.key]
            for key, is_video in keys:
                data = task.get("data")
                url = data.get(key) if isinstance(data, dict) else None
                if not isinstance(url, str) or not url:
                    log.info("task %s: nothing to prefetch (no data.%s)", task.get("id"), key)
                    continue
                if not self._prefetches.acquire(blocking=False):
                    log.info(
                        "task %s: not prefetched, %d prefetches are waiting already "
                        "(TAPMASK_PREFETCH_QUEUE)",
                        task.get("id"),
                        self.settings.prefetch_queue,
                    )
                    continue
                self._prefetcher.submit(self._prefetch_one, task.get("id"), url, creds, is_video)

    def _prefetch_one(self, task_id: Any, url: str, creds: Credentials, is_video: bool) -> None:
        try:
            if is_video:
                self.video.video(url, creds)
            else:
                self.dispatcher.prefetch(self.settings.model, self.client.fetch(url, creds))
        except Exception as exc:  # background work: log, never raise
            log.warning("task %s: prefetch failed: %s", task_id, exc)
        finally:
            self._prefetches.release()
