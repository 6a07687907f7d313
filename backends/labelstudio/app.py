"""The Label Studio ML backend over HTTP (FastAPI): routing only.

Each route parses the body and calls ``LabelStudioService`` (``service.py``), which holds the
request logic. ``/health`` and ``/setup`` are ``async`` and touch no model, so they answer within
Label Studio's 1 s / 3 s budgets even while every worker thread is busy with ``/predict`` (which
runs in Starlette's thread pool).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends import __version__, jsonbody
from backends.dispatch import Dispatcher
from backends.errors import RequestTooLarge, TapmaskError
from backends.labelstudio.client import ImageClient
from backends.labelstudio.metrics import Metrics
from backends.labelstudio.service import LabelStudioService, Settings
from backends.settings import check_limits

__all__ = ["Settings", "create_app"]

log = logging.getLogger("tapmask.labelstudio")

ENDPOINTS = frozenset({"/health", "/setup", "/predict", "/webhook", "/versions", "/metrics"})


def _error(exc: TapmaskError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(exc.code).inc()
    return JSONResponse(exc.to_dict(), status_code=exc.status)


def create_app(
    dispatcher: Dispatcher,
    settings: Settings | None = None,
    image_client: ImageClient | None = None,
) -> FastAPI:
    check_limits()  # an unusable TAPMASK_MAX_* value stops the server here, not per request
    service = LabelStudioService(dispatcher, settings, image_client)
    settings = service.settings
    metrics = Metrics(service.stats)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="tapmask Label Studio ML backend", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.image_client = service.client

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
        label = endpoint if endpoint in ENDPOINTS else "other"
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
        """The body as JSON (``None`` when empty), read up to the byte limit: a chunked body
        has no Content-Length for the middleware to check. Parsed off the event loop, within
        the nesting and digit limits of ``backends.jsonbody``."""
        limit, total, chunks = settings.max_request_bytes, 0, []
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestTooLarge(
                    f"request body is over the {limit}-byte limit (TAPMASK_MAX_REQUEST_MB)"
                )
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return None
        return await run_in_threadpool(jsonbody.loads, raw)

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": f"tapmask:{settings.model}"}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        return service.setup(await json_body(request))

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
        return await run_in_threadpool(service.predict, payload)

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
