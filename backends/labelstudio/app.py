"""The Label Studio ML backend over HTTP (FastAPI).

Handlers stay thin: parse the Label Studio payload → dispatch to the models → format regions.
``/health`` and ``/setup`` are ``async`` and touch no model, so they answer within Label Studio's
1 s / 3 s budgets even while every worker thread is busy with ``/predict`` (which runs in
Starlette's thread pool).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from backends import __version__, images
from backends.errors import EmptyMask, TapmaskError
from backends.labelstudio.client import Credentials, ImageClient
from backends.labelstudio.labelconfig import LabelConfig
from backends.labelstudio.metrics import Metrics
from backends.labelstudio.predict import (
    BadRequest,
    ObjectRequest,
    PredictRequest,
    objects_from_context,
    regions,
    to_prompt,
)
from backends.queue import Dispatcher

log = logging.getLogger("tapmask.labelstudio")


@dataclass
class Settings:
    model: str = field(default_factory=lambda: os.environ.get("MODEL", "grabcut"))
    label_studio_url: str | None = field(
        default_factory=lambda: os.environ.get("LABEL_STUDIO_URL") or None
    )
    api_key: str | None = field(
        default_factory=lambda: os.environ.get("LABEL_STUDIO_API_KEY") or None
    )
    basic_auth_user: str | None = field(
        default_factory=lambda: os.environ.get("BASIC_AUTH_USER") or None
    )
    basic_auth_pass: str | None = field(
        default_factory=lambda: os.environ.get("BASIC_AUTH_PASS") or None
    )
    # Label Studio sends every annotation and prediction of a task (with their RLEs) along.
    max_request_bytes: int = field(
        default_factory=lambda: int(float(os.environ.get("TAPMASK_MAX_REQUEST_MB", 256)) * 2**20)
    )
    prefetch_threads: int = 2
    polygon_tolerance: float = 1.0

    @property
    def model_version(self) -> str:
        return f"tapmask-{__version__}-{self.model}"


class Projects:
    """Per-project Label Studio address and token, as pushed by ``/setup`` (env as fallback)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._by_project: dict[str, Credentials] = {}
        self._lock = threading.Lock()

    def remember(self, project: str | None, hostname: str | None, token: str | None) -> None:
        if project is None:
            return
        with self._lock:
            self._by_project[project] = Credentials(hostname or None, token or None)

    def credentials(self, project: str | None) -> Credentials:
        env = Credentials(self._settings.label_studio_url, self._settings.api_key)
        with self._lock:
            pushed = self._by_project.get(project or "")
        if pushed is None:
            return env
        # The environment wins: /setup's hostname defaults to localhost, wrong inside Docker.
        return Credentials(env.url or pushed.url, env.token or pushed.token)


def _error(exc: TapmaskError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(exc.code).inc()
    return JSONResponse(exc.to_dict(), status_code=exc.status)


def create_app(
    dispatcher: Dispatcher,
    settings: Settings | None = None,
    image_client: ImageClient | None = None,
) -> FastAPI:
    settings = settings or Settings()
    client = image_client or ImageClient()
    projects = Projects(settings)
    prefetcher = ThreadPoolExecutor(settings.prefetch_threads, thread_name_prefix="ls-prefetch")
    prefetching: set[str] = set()
    prefetch_lock = threading.Lock()

    def cache_stats() -> dict[str, dict[str, float]]:
        engine = getattr(dispatcher, "engine", None)
        stats = {}
        if engine is not None:
            for cache in (engine.images, engine.embeddings, engine.states):
                stats[cache.name] = vars(cache.stats)
        stats["image-downloads"] = vars(client.cache.stats)
        return stats

    metrics = Metrics(cache_stats)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        prefetcher.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tapmask Label Studio ML backend", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.dispatcher = dispatcher
    app.state.image_client = client

    @app.middleware("http")
    async def measure_and_authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        endpoint = request.url.path
        started = time.perf_counter()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_request_bytes:
            response: Response = JSONResponse(
                {
                    "error": "request_too_large",
                    "detail": f"request body of {int(declared)} bytes is over the "
                    f"{settings.max_request_bytes}-byte limit (TAPMASK_MAX_REQUEST_MB)",
                },
                status_code=413,
            )
        elif settings.basic_auth_user and not _basic_auth_ok(request, settings):
            response = JSONResponse(
                {"error": "unauthorized", "detail": "basic authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="tapmask"'},
            )
        else:
            response = await call_next(request)
        known = endpoint in {"/health", "/setup", "/predict", "/webhook", "/versions", "/metrics"}
        label = endpoint if known else "other"
        metrics.requests.labels(label, str(response.status_code)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(TapmaskError)
    async def tapmask_error(request: Request, exc: TapmaskError) -> JSONResponse:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc)
        return _error(exc, metrics)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        metrics.errors.labels("internal_error").inc()
        return JSONResponse(
            {"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}, status_code=500
        )

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": f"tapmask:{settings.model}"}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise BadRequest("/setup expects a JSON object")
        project = body.get("project")
        project_id = None if project is None else str(project).split(".")[0]
        projects.remember(project_id, body.get("hostname"), body.get("access_token"))
        return {"model_version": settings.model_version}

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return {"versions": [settings.model_version]}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        action = body.get("action") if isinstance(body, dict) else None
        log.debug("webhook %s ignored (tapmask does not train)", action)
        return {"status": "ok", "action": action}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        payload = await json_body(request)
        return await run_in_threadpool(_predict, payload)

    def _predict(payload: Any) -> dict[str, Any]:
        try:
            request = PredictRequest.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors()
            )
            raise BadRequest(f"invalid /predict request: {problems}") from exc
        config = LabelConfig.parse(request.label_config)
        creds = projects.credentials(request.project_id)
        context = request.context
        if not context or not context.get("result"):
            _prefetch_tasks(request, config, creds)
            # Nothing to show yet: an empty list stores no junk prediction in Label Studio.
            return {"results": []}
        task = request.tasks[0]
        results: list[dict[str, Any]] = []
        empty: list[EmptyMask] = []
        for obj in objects_from_context(context):
            try:
                results.extend(_segment_object(task, obj, config, creds))
            except EmptyMask as exc:  # one box over nothing must not lose the other objects
                empty.append(exc)
        if not results:
            raise empty[0] if empty else EmptyMask("no region to return")
        score = max(r["score"] for r in results)
        return {
            "results": [
                {"result": results, "score": score, "model_version": settings.model_version}
            ]
        }

    def _task_image(task: dict[str, Any], config: LabelConfig, to_name: str) -> str:
        key = config.image_key(to_name)
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
            raise BadRequest(f"task {task.get('id')} has no image URL in data.{key}")
        return data[key]

    def _segment_object(
        task: dict[str, Any], obj: ObjectRequest, config: LabelConfig, creds: Credentials
    ) -> list[dict[str, Any]]:
        url = _task_image(task, config, obj.to_name)
        started = time.perf_counter()
        image = client.fetch(url, creds)
        fetched = time.perf_counter()
        height, width = images.size(image)
        prompt = to_prompt(obj, width, height)
        seg = dispatcher.segment(settings.model, image, prompt)
        if seg.area == 0:
            raise EmptyMask(f"{settings.model} found no object for these clicks")
        out = regions(
            seg,
            obj,
            config,
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

    def _prefetch_tasks(request: PredictRequest, config: LabelConfig, creds: Credentials) -> None:
        for task in request.tasks:
            for to_name in config.images:
                try:
                    url = _task_image(task, config, to_name)
                except TapmaskError as exc:
                    log.info("task %s: nothing to prefetch (%s)", task.get("id"), exc)
                    continue
                with prefetch_lock:
                    if url in prefetching:
                        continue
                    prefetching.add(url)
                prefetcher.submit(_prefetch_one, task.get("id"), url, creds)

    def _prefetch_one(task_id: Any, url: str, creds: Credentials) -> None:
        try:
            dispatcher.prefetch(settings.model, client.fetch(url, creds))
        except Exception as exc:  # background work: log, never raise
            log.warning("task %s: prefetch failed: %s", task_id, exc)
        finally:
            with prefetch_lock:
                prefetching.discard(url)

    return app


def _basic_auth_ok(request: Request, settings: Settings) -> bool:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, settings.basic_auth_user or "") and secrets.compare_digest(
        password, settings.basic_auth_pass or ""
    )
