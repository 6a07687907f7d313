"""The nuclio handler shared by every tapmask CVAT function: parse → dispatch → format.

nuclio imports ``main.py`` of a function (a re-export of this module), calls
:func:`init_context` once per worker process and :func:`handler` per request.

Configuration is environment only (``spec.env`` in ``function.yaml``):

``TAPMASK_MODEL``
    registry name of the model to serve: ``grabcut`` (default), ``sam``, ``sam-vit_b|l|h``,
    ``ritm-h18``, ``ritm-h18s``, ``ritm-h32``. Checkpoints come from the model's own variables
    (``SAM_CHECKPOINT``, ``RITM_CHECKPOINT``, ``TAPMASK_MODELS_DIR``), never downloaded.
    A video tracker (``flow``, ``sam2.1-hiera-*-video``, ``edgetam-video``) makes this a
    tracker function: ``{image, shapes, states}`` in, ``{shapes, states}`` out
    (``backends.cvat.tracking``).
``TAPMASK_CVAT_MODE``
    ``decode`` (default): reply ``{mask, bounds, points}``. ``embedding``: reply ``{blob}``, the
    SAM image embedding for CVAT's stock SAM browser plugin (function name
    ``pth-facebookresearch-sam-vit-h``); SAM is then built with ``autocast=False`` because the
    plugin's ONNX decoder expects fp32-faithful embeddings.
    ``detector``: CVAT's "Automatic annotation" (``backends/cvat/detector.py``): text-prompted
    masks of the function's labels (``TAPMASK_DETECTOR_LABELS``), a list of CVAT detector items.
``TAPMASK_DETECTOR``
    detector mode: the registry name of the detector in front of ``TAPMASK_MODEL`` (default
    ``grounding-dino-tiny``; its weights from ``GROUNDING_DINO_MODEL_DIR``).
``TAPMASK_PLUGINS``
    optional comma-separated modules imported before the models load (they register extra
    models, as ``tapmask worker --plugin`` does).
``TAPMASK_DEVICE``
    ``cpu``, ``cuda``, ``cuda:1``… (default: the model's own choice, CUDA when available).
``TAPMASK_MODEL_OPTIONS``
    optional JSON object of extra model-factory options, e.g. ``{"max_size": 800}`` for RITM
    (tests pass a tiny SAM ``architecture`` this way).

Limits (``TAPMASK_MAX_REQUEST_MB``, ``TAPMASK_MAX_JSON_DEPTH``, ``TAPMASK_MAX_NUMBER_DIGITS``,
``TAPMASK_MAX_CLICKS``, ``TAPMASK_MAX_IMAGE_MB``, ``TAPMASK_MAX_PIXELS``; see
``backends.settings``) are checked before the image is decoded; each answers its own 4xx.

Errors never escape :func:`handler`: a ``TapmaskError`` answers its own 4xx/5xx status, anything
else 500, always with a JSON ``{"error", "detail"}`` body, and the details are logged with
``context.logger.error_with`` because CVAT shows the user only the status. An error in
:func:`init_context` (missing checkpoint…) is logged and re-raised: nuclio then reports the
function as failed at deploy time instead of serving 500s.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends import images
from backends.cvat import detector, formats, tracking
from backends.dispatch import dispatcher_from_env
from backends.errors import ModelLoadError, ModelNotFound, TapmaskError
from backends.models import registry
from backends.preannotate.settings import detector_name
from backends.settings import check_limits

ENV_MODEL = "TAPMASK_MODEL"
ENV_MODE = "TAPMASK_CVAT_MODE"
ENV_DEVICE = "TAPMASK_DEVICE"
ENV_OPTIONS = "TAPMASK_MODEL_OPTIONS"

ENV_DETECTOR = "TAPMASK_DETECTOR"
ENV_PLUGINS = "TAPMASK_PLUGINS"

MODE_DECODE = "decode"
MODE_EMBEDDING = "embedding"
MODE_DETECTOR = "detector"
MODES = (MODE_DECODE, MODE_EMBEDDING, MODE_DETECTOR)

DEFAULT_MODEL = {MODE_DECODE: "grabcut", MODE_EMBEDDING: "sam-vit_h", MODE_DETECTOR: "grabcut"}

#: The only function name CVAT's UI loads its SAM browser plugin for.
STOCK_SAM_FUNCTION = "pth-facebookresearch-sam-vit-h"


@dataclass(frozen=True)
class Settings:
    model: str
    mode: str = MODE_DECODE
    options: Mapping[str, Any] = field(default_factory=dict)
    detector: str | None = None  # detector mode only
    plugins: tuple[str, ...] = ()

    @property
    def tracker(self) -> bool:
        """A video tracker (``type: tracker`` function): frames with shapes and states."""
        try:
            return registry.spec(self.model).kind == "tracker"
        except ModelNotFound:
            return False


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the function's configuration; raises ``ModelLoadError`` for unusable values."""
    env = os.environ if environ is None else environ
    mode = (env.get(ENV_MODE) or MODE_DECODE).strip().lower()
    if mode not in MODES:
        raise ModelLoadError(f"{ENV_MODE}={mode!r}: expected one of {', '.join(MODES)}")
    model = (env.get(ENV_MODEL) or DEFAULT_MODEL[mode]).strip()
    options: dict[str, Any] = {}
    raw = env.get(ENV_OPTIONS, "").strip()
    if raw:
        try:
            options = json.loads(raw)
        except ValueError as exc:
            raise ModelLoadError(f"{ENV_OPTIONS} is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise ModelLoadError(f"{ENV_OPTIONS} must be a JSON object, got {raw!r}")
    device = (env.get(ENV_DEVICE) or "").strip()
    if device:
        options["device"] = device
    if mode == MODE_EMBEDDING:
        options["autocast"] = False
    detector = None
    if mode == MODE_DETECTOR:
        detector = (env.get(ENV_DETECTOR) or "").strip() or detector_name()
    plugins = tuple(p.strip() for p in env.get(ENV_PLUGINS, "").split(",") if p.strip())
    return Settings(model, mode, options, detector, plugins)


def init_context(context: Any) -> None:
    """Load the model once per worker; keep the dispatcher on ``context.user_data``."""
    started = time.perf_counter()
    try:
        check_limits()  # an unusable TAPMASK_MAX_* value fails the deploy, not each request
        settings = settings_from_env()
        if settings.mode == MODE_EMBEDDING and settings.model not in ("sam", "sam-vit_h"):
            context.logger.warn_with(
                "the stock CVAT SAM plugin decodes with a ViT-H decoder; other weights decode "
                "badly with it (serve them in decode mode instead)",
                model=settings.model,
            )
        if settings.plugins:
            from backends.redis.startup import load_plugins

            load_plugins(settings.plugins)
        config = detector.config_from_env(os.environ) if settings.detector else None
        models = [settings.model, *([settings.detector] if settings.detector else [])]
        dispatcher = dispatcher_from_env(models, **settings.options)
    except Exception as exc:
        context.logger.error_with(
            "tapmask: cannot start the function",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
        raise
    context.user_data.settings = settings
    context.user_data.dispatcher = dispatcher
    context.user_data.click_order = formats.ClickOrder()
    context.user_data.detector_config = config
    context.logger.info_with(
        "tapmask ready",
        model=settings.model,
        mode=settings.mode,
        seconds=round(time.perf_counter() - started, 3),
    )


def _respond(context: Any, body: str, status: int = 200) -> Any:
    return context.Response(
        body=body, headers={}, content_type="application/json", status_code=int(status)
    )


def _serve(context: Any, event: Any) -> str:
    user = context.user_data
    settings: Settings = user.settings
    data = formats.request_data(event.body)
    if settings.mode == MODE_EMBEDDING:
        image = formats.parse_embedding_request(data)
        return formats.embedding_reply(user.dispatcher.export_embedding(settings.model, image))
    if settings.tracker:
        tracked = tracking.parse_tracker_request(data)
        answers = user.dispatcher.track(settings.model, tracked.image, list(tracked.targets))
        return tracking.tracker_reply(tracked, answers)
    if settings.mode == MODE_DETECTOR:
        request = detector.parse_detector_request(data)
        config = user.detector_config
        found = detector.detect(user.dispatcher, settings.model, settings.detector, config, request)
        return detector.detector_reply(found, config)
    request = formats.parse_interactor_request(data)
    prompt = user.click_order.prompt(images.sha256(request.image), request)
    # ``request.threshold`` is validated but not applied: models return binary masks.
    segmentation = user.dispatcher.segment(settings.model, request.image, prompt)
    return formats.mask_reply(segmentation)


def handler(context: Any, event: Any) -> Any:
    """One CVAT request; always answers a JSON ``context.Response``, never raises."""
    started = time.perf_counter()
    try:
        body = _serve(context, event)
    except Exception as exc:
        status, body = formats.error_reply(exc)
        details: dict[str, Any] = {
            "status": status,
            "error": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not isinstance(exc, TapmaskError):
            details["traceback"] = traceback.format_exc()
        context.logger.error_with("tapmask: request failed", **details)
        return _respond(context, body, status)
    context.logger.debug_with(
        "tapmask: answered",
        bytes=len(body),
        seconds=round(time.perf_counter() - started, 3),
    )
    return _respond(context, body)
