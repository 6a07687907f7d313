"""Dispatchers: the one seam between front ends and compute.

Front ends call a ``Dispatcher`` and never touch the Engine directly, so switching from the
in-process default to the shared Redis worker pool is configuration, not code.
``LocalDispatcher`` runs the Engine in this process; prefetches (Label Studio task-open calls)
run on a background thread so the request that triggered them answers at once.
``RedisDispatcher`` (``backends.redis.dispatcher``, imported only when used) sends the same calls
to the shared worker pool: setting ``TAPMASK_REDIS_URL`` is the whole switch. Both dispatchers
de-duplicate prefetches of the same (model, image), so front ends simply ask.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from backends.engine import Engine
from backends.models.detection import Detection, Thresholds
from backends.prompts import Prompt, Segmentation

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def segment(
        self,
        model: str,
        image: bytes,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        batch: bool = False,
    ) -> Segmentation:
        """The mask for ``prompt`` on ``image`` (file bytes). Raises ``TapmaskError``s.
        ``batch=True``: batch work (pre-annotation), which interactive clicks overtake."""
        ...

    def detect(
        self,
        detector: str,
        image: bytes,
        prompts: list[str],
        thresholds: Thresholds | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Detection]:
        """Detector ``detector``'s boxes for the phrases ``prompts`` on ``image``, best first
        (``Detection.prompt_index`` indexes ``prompts``). Batch work."""
        ...

    def prefetch(self, model: str, image: bytes) -> None:
        """Start computing the image's embedding in the background; returns at once."""
        ...

    def export_embedding(
        self, model: str, image: bytes, *, timeout: float | None = None
    ) -> np.ndarray:
        """The model's raw image embedding (for tools that decode clicks themselves)."""
        ...

    def models(self) -> list[str]:
        """Names of the models this dispatcher can serve."""
        ...

    def stats(self) -> dict[str, dict[str, float]]:
        """Cache counters by cache name (hits, misses, entries, bytes…) for ``/metrics``."""
        ...

    def close(self) -> None: ...


class LocalDispatcher:
    """In-process dispatcher over an ``Engine``: the embedded default (no Redis needed)."""

    def __init__(self, engine: Engine, *, prefetch_threads: int = 1, max_pending: int = 256):
        self.engine = engine
        self._executor = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="prefetch")
        self._pending: dict[tuple[str, str], Future[None]] = {}
        self._lock = threading.Lock()
        self._max_pending = max_pending

    def segment(
        self,
        model: str,
        image: bytes,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        batch: bool = False,
    ) -> Segmentation:
        return self.engine.segment(model, image, prompt)

    def detect(
        self,
        detector: str,
        image: bytes,
        prompts: list[str],
        thresholds: Thresholds | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Detection]:
        return self.engine.detect(detector, image, prompts, thresholds)

    def prefetch(self, model: str, image: bytes) -> None:
        self.engine.model(model)  # unknown model: fail in the caller, not silently later
        key = (model, self.engine.put_image(image))
        with self._lock:
            if key in self._pending or len(self._pending) >= self._max_pending:
                return
            future = self._executor.submit(self._prefetch, model, key[1])
            self._pending[key] = future
        future.add_done_callback(lambda _f, key=key: self._done(key))

    def _prefetch(self, model: str, image_key: str) -> None:
        try:
            self.engine.prefetch(model, image_key)
        except Exception:  # a failed prefetch must never take the process down
            log.exception("prefetch of %s for %s failed", image_key[:12], model)

    def _done(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def wait_prefetches(self, timeout: float | None = None) -> None:
        """Block until queued prefetches finish (tests, CLI)."""
        with self._lock:
            futures = list(self._pending.values())
        for future in futures:
            future.result(timeout=timeout)

    def export_embedding(
        self, model: str, image: bytes, *, timeout: float | None = None
    ) -> np.ndarray:
        return self.engine.export_embedding(model, image)

    def models(self) -> list[str]:
        return self.engine.model_names

    def stats(self) -> dict[str, dict[str, float]]:
        engine = self.engine
        return {
            cache.name: vars(cache.stats)
            for cache in (engine.images, engine.embeddings, engine.states)
        }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def dispatcher_from_env(
    models: list[str], checkpoints: dict[str, str | None] | None = None, **options: object
) -> Dispatcher:
    """The dispatcher a front end should use, chosen by configuration only.

    With ``TAPMASK_REDIS_URL`` set: a ``RedisDispatcher`` for ``models`` (nothing is loaded
    here, the workers own the models and their options; Redis is not contacted until the first
    request, so a front end starts, and answers 503, while Redis or the workers are down).
    Tuning: ``TAPMASK_QUEUE_TTL`` (s, default 5), ``TAPMASK_JOB_TIMEOUT`` (s, default 60),
    ``TAPMASK_IMAGE_TTL`` (s, default 3600), ``TAPMASK_REDIS_NAMESPACE`` (default tapmask).

    Without it, the models (segmenters and detectors) are loaded here and run in-process;
    ``options`` go to every model factory (device…), ``checkpoints`` name one model's
    checkpoint each (a detector's differs from the segmenter's).
    """
    if os.environ.get("TAPMASK_REDIS_URL"):
        from backends.redis.dispatcher import RedisDispatcher

        if options or checkpoints:
            log.info("Redis dispatcher: model options %s are the workers' business", options)
        return RedisDispatcher.from_env(models)
    engine = Engine()
    for name in models:
        checkpoint = (checkpoints or {}).get(name)
        engine.load([name], **options, **({"checkpoint": checkpoint} if checkpoint else {}))
    return LocalDispatcher(engine)
