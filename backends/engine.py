"""The Engine: models plus the caches that make every click after the first one cheap.

``engine.segment(model, image, prompt)`` is the whole surface. Three caches sit behind it:

* decoded images by sha256, so a repeat click neither re-sends nor re-decodes the frame;
* embeddings by (model, sha256): SAM's image encoder runs once per image, not once per click;
* interaction states by (model, sha256, box, clicks so far). Tools resend every click on every
  request; the Engine finds the longest earlier prefix it has a state for and continues from
  there, so click *n* refines click *n-1*'s result (SAM's low-res logits, RITM's probability map)
  instead of starting over. For models whose answer depends on that history
  (``replays_history``), a missing prefix is rebuilt by decoding the earlier prefixes in order, so
  the answer is the same whether or not the cache had it.

Progressive mode (``backends/progressive.py``, per model: ``EngineConfig.progressive``, env
``TAPMASK_PROGRESSIVE``, default the model's ``progressive_default``): from the second step on,
the model's new mask replaces the previous step's mask only in the region the last click is
about. The merged mask is what the state cache keeps for the step and what the next step merges
into; it depends on the whole history, so in this mode every model replays a missing prefix.

One lock per model: a model never runs two requests at once on its device, while different models
(and cache hits) proceed in parallel.

Detectors (``backends.models.detection``: text → boxes, for pre-annotation) are models of the same
Engine: ``load`` adds whatever the registry builds, ``detect(detector, image, prompts, …)`` runs
one on the cached decoded image under its own lock. They have no embedding or state to cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends import images
from backends.cache import LRUCache
from backends.embedding_cache import EmbeddingCache, SharedEmbeddings, guard_device_memory
from backends.errors import ModelNotFound, TooManyObjects, UnknownImage, Unsupported
from backends.models import registry
from backends.models.base import (
    ExportsEmbedding,
    Segmenter,
    accepts_box,
    progressive_default,
)
from backends.models.detection import Detection, Detector, Thresholds, check_prompts
from backends.models.tracking import is_tracker
from backends.progressive import MergeOptions, merge, settings_from_env
from backends.progressive import enabled as progressive_enabled
from backends.prompts import Prompt, Segmentation, TrackAnswer, TrackTarget
from backends.settings import MAX_TRACKED_OBJECTS
from backends.tracking import TrackingService

log = logging.getLogger(__name__)

MiB = 1 << 20


def _env_mib(name: str, default_mib: int) -> int:
    return int(float(os.environ.get(name, default_mib)) * MiB)


@dataclass
class EngineConfig:
    embedding_cache_bytes: int = field(
        default_factory=lambda: _env_mib("TAPMASK_EMBEDDING_CACHE_MB", 2048)
    )
    #: Host memory that embeddings evicted from the device tier move to (0: dropped instead).
    embedding_spill_bytes: int = field(
        default_factory=lambda: _env_mib("TAPMASK_EMBEDDING_SPILL_MB", 0)
    )
    state_cache_bytes: int = field(default_factory=lambda: _env_mib("TAPMASK_STATE_CACHE_MB", 512))
    image_cache_bytes: int = field(default_factory=lambda: _env_mib("TAPMASK_IMAGE_CACHE_MB", 1024))
    #: Video trackers' per-object states (``backends.tracking``), by handle.
    track_state_cache_bytes: int = field(
        default_factory=lambda: _env_mib("TAPMASK_TRACK_STATE_CACHE_MB", 512)
    )
    # Progressive mode per model name ("*": every model); a model not named here uses its
    # ``progressive_default`` attribute (False when it has none).
    progressive: dict[str, bool] = field(default_factory=settings_from_env)
    merge: MergeOptions = field(default_factory=MergeOptions)


@dataclass
class EngineStats:
    """What the Engine did since start (worker metrics and heartbeats report these)."""

    encodes: int = 0  # images through an image encoder (a batched pass counts each image)
    decodes: int = 0  # clicks (and boxes) decoded, replayed history included
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    state_hits: int = 0  # clicks continued from a cached interaction state
    shared_hits: int = 0  # embeddings taken from the shared tier instead of encoding
    batched_encodes: int = 0  # images encoded in one pass together with others
    spill_hits: int = 0  # embeddings moved back from host memory instead of encoding
    out_of_memory: int = 0  # device out-of-memory errors answered with 503


ImageRef = bytes | str  # file bytes, or the sha256 of bytes the Engine has already seen


class Engine:
    def __init__(
        self,
        models: dict[str, Segmenter] | None = None,
        config: EngineConfig | None = None,
        loader: Callable[..., Segmenter | Detector] = registry.create,
        shared_embeddings: SharedEmbeddings | None = None,
        shared_track_states: SharedEmbeddings | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.shared_embeddings = shared_embeddings
        self._loader = loader
        self._models: dict[str, Segmenter] = {}
        self._detectors: dict[str, Detector] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()
        self.stats = EngineStats()
        self.images: LRUCache[np.ndarray] = LRUCache(self.config.image_cache_bytes, "images")
        self.embedding_cache = EmbeddingCache(
            self.stats,
            self.config.embedding_cache_bytes,
            self.config.embedding_spill_bytes,
            shared_embeddings,
        )
        self.embeddings = self.embedding_cache.device  # the device tier (tests, metrics)
        self.states: LRUCache[tuple[Segmentation, Any]] = LRUCache(
            self.config.state_cache_bytes, "states"
        )
        self.tracking = TrackingService(self.config.track_state_cache_bytes, shared_track_states)
        for name, model in (models or {}).items():
            self.add_model(name, model)

    # -- models ----------------------------------------------------------------------------
    def add_model(self, name: str, model: Segmenter) -> None:
        with self._registry_lock:
            self._models[name] = model
            self._locks.setdefault(name, threading.Lock())

    def add_detector(self, name: str, detector: Detector) -> None:
        with self._registry_lock:
            self._detectors[name] = detector
            self._locks.setdefault(name, threading.Lock())

    def load(self, names: Iterable[str], **options: Any) -> None:
        """Build and add models (segmenters and detectors) by registry name (done at start-up,
        never per request)."""
        for name in names:
            if name not in self._models and name not in self._detectors:
                started = time.perf_counter()
                built = self._loader(name, **options)
                if isinstance(built, Detector) and not isinstance(built, Segmenter):
                    self.add_detector(name, built)
                else:
                    self.add_model(name, built)
                log.info("loaded model %s in %.1f s", name, time.perf_counter() - started)

    @property
    def model_names(self) -> list[str]:
        """The segmenters served here."""
        return sorted(self._models)

    @property
    def detector_names(self) -> list[str]:
        return sorted(self._detectors)

    def detector(self, name: str) -> Detector:
        try:
            return self._detectors[name]
        except KeyError:
            served = ", ".join(self.detector_names) or "none"
            raise ModelNotFound(
                f"detector {name!r} is not served here (detectors served: {served})"
            ) from None

    def model(self, name: str) -> Segmenter:
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self.model_names) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {served})") from None

    # -- images ----------------------------------------------------------------------------
    def put_image(self, data: bytes) -> str:
        """Decode and keep an image; returns its key (sha256 of the bytes)."""
        key = images.sha256(data)
        if key not in self.images:
            self.images.put(key, images.decode(data))
        return key

    def image(self, ref: ImageRef) -> tuple[str, np.ndarray]:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            data = bytes(ref)
            key = images.sha256(data)
            array = self.images.get(key)
            if array is None:
                array = images.decode(data)
                self.images.put(key, array)
            return key, array
        array = self.images.get(ref)
        if array is None:
            raise UnknownImage(f"image {ref[:12]}… is not cached here; send the image bytes")
        return ref, array

    # -- embeddings ------------------------------------------------------------------------
    def _embedding(self, name: str, model: Segmenter, key: str, image: np.ndarray) -> Any:
        """Caller holds the model lock, so a concurrent first click waits and then hits."""
        return self.embedding_cache.get_or_encode(name, model, key, image)

    def has_embedding(self, name: str, image_key: str) -> bool:
        """Whether a click on this image would be a decode only (device or host tier)."""
        return (name, image_key) in self.embedding_cache

    def prefetch(self, name: str, image: ImageRef) -> str:
        """Compute and cache the image's embedding ahead of the first click."""
        model = self.model(name)
        key, array = self.image(image)
        with self._locks[name]:
            self._embedding(name, model, key, array)
        return key

    def prefetch_many(self, name: str, refs: list[ImageRef], max_batch: int = 8) -> int:
        """Encode the images no tier holds yet, up to ``max_batch`` per batched pass (a worker
        that sees several first clicks or prefetches waiting); returns how many it encoded."""
        model = self.model(name)
        items = [self.image(ref) for ref in refs]
        with self._locks[name]:
            return self.embedding_cache.encode_many(name, model, items, max_batch)

    def export_embedding(self, name: str, image: ImageRef) -> np.ndarray:
        """The model's raw image embedding as a numpy array (CVAT's stock SAM plugin needs it)."""
        model = self.model(name)
        if not isinstance(model, ExportsEmbedding):
            raise Unsupported(f"model {name!r} has no exportable image embedding")
        key, array = self.image(image)
        with self._locks[name]:
            embedding = self._embedding(name, model, key, array)
            return np.asarray(model.export_embedding(embedding))

    # -- detection -------------------------------------------------------------------------
    def detect(
        self,
        name: str,
        image: ImageRef,
        prompts: list[str],
        thresholds: Thresholds | None = None,
    ) -> list[Detection]:
        """Detector ``name``'s boxes for ``prompts`` on ``image``, best first (the phrases are
        checked against the text-prompt limits before the image is touched)."""
        detector = self.detector(name)
        phrases = check_prompts(prompts)
        thresholds = thresholds or Thresholds()
        _key, array = self.image(image)
        with self._locks[name]:
            return detector.detect(array, phrases, thresholds.box, thresholds.text)

    # -- segmentation ----------------------------------------------------------------------
    def segment(self, name: str, image: ImageRef, prompt: Prompt) -> Segmentation:
        model = self.model(name)
        if is_tracker(model):
            raise Unsupported(f"model {name!r} is a video tracker: it tracks, it does not segment")
        key, array = self.image(image)
        height, width = array.shape[:2]
        prompt = prompt.validated(width, height)
        with self._locks[name]:
            embedding = self._embedding(name, model, key, array)
            if prompt.previous_mask is not None:
                # A caller-supplied mask replaces the history: decode once, cache nothing.
                result = self._decode(model, array, embedding, prompt, None)[0]
                if self.progressive(name):
                    # Every click is a step after the mask: each changes it only near itself.
                    merged = np.asarray(prompt.previous_mask, dtype=bool)
                    for click in prompt.clicks:
                        merged = merge(merged, result.mask, click, self.config.merge)
                    result.mask = merged
                return result
            merging = self.progressive(name)
            replays = model.replays_history or merging
            steps = self._steps(prompt, model) if replays else [prompt]
            start, state, previous = self._resume_point(name, key, replays, prompt, steps)
            if start == len(steps) and previous is not None:
                return previous  # the whole interaction is cached: a repeated request
            for step in steps[start:]:
                result, state = self._decode(model, array, embedding, step, state)
                if merging and previous is not None and step.clicks:
                    result.mask = merge(
                        previous.mask, result.mask, step.clicks[-1], self.config.merge
                    )
                self.states.put((name, key, step.key()), (result, state))
                previous = result
            assert previous is not None
            return previous

    def track(self, name: str, image: ImageRef, targets: list[TrackTarget]) -> list[TrackAnswer]:
        """Follow each target onto ``image`` with tracker ``name`` (``backends.tracking``):
        answers aligned with ``targets``, each with a fresh state handle."""
        model = self.model(name)
        if not is_tracker(model):
            raise Unsupported(f"model {name!r} does not track video; choose a tracker")
        limit = int(MAX_TRACKED_OBJECTS)
        if len(targets) > limit:
            raise TooManyObjects(
                f"{len(targets)} objects to track; at most {limit} (TAPMASK_MAX_TRACKED_OBJECTS)"
            )
        _key, array = self.image(image)
        height, width = array.shape[:2]
        checked = [target.validated(width, height) for target in targets]
        with self._locks[name]:
            return self.tracking.track(name, model, array, checked)  # type: ignore[arg-type]

    def progressive(self, name: str) -> bool:
        """Whether model ``name`` answers in progressive mode (see the module docstring)."""
        default = progressive_default(self.model(name))
        return progressive_enabled(self.config.progressive, name, default)

    def _resume_point(
        self, name: str, key: str, replays: bool, prompt: Prompt, steps: list[Prompt]
    ) -> tuple[int, Any, Segmentation | None]:
        """Index of the first step to decode, the state to start it from, and the cached result
        of the step before it (all steps cached, a repeated request: index ``len(steps)``)."""
        for index in range(len(steps) - 1, -1, -1):
            cached = self.states.get((name, key, steps[index].key()))
            if cached is not None:
                self.stats.state_hits += 1
                return index + 1, cached[1], cached[0]
        if not replays and len(prompt.clicks) > (0 if prompt.box else 1):
            # Models without history still refine from the previous click's state if we have it.
            previous = self.states.get((name, key, prompt.prefix(len(prompt.clicks) - 1).key()))
            if previous is not None:
                self.stats.state_hits += 1
                return 0, previous[1], None
        return 0, None, None

    @staticmethod
    def _steps(prompt: Prompt, model: Segmenter) -> list[Prompt]:
        """Every prefix of the interaction, in the order the annotator made it.

        A box is the first step for models that take one; models that do not (RITM) start at
        the first click.
        """
        box_step = prompt.box is not None and (accepts_box(model) or not prompt.clicks)
        first = 0 if box_step else 1
        return [prompt.prefix(n) for n in range(first, len(prompt.clicks) + 1)]

    def _decode(
        self, model: Segmenter, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any
    ) -> tuple[Segmentation, Any]:
        started = time.perf_counter()
        with guard_device_memory(self.embedding_cache, model, "decoding a click"):
            result, new_state = model.decode(image, embedding, prompt, state)
        self.stats.decodes += 1
        self.stats.decode_seconds += time.perf_counter() - started
        if not result.model:
            result.model = getattr(model, "name", "")
        return result, new_state
