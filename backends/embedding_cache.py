"""Image embeddings by (model, image sha256) in up to three tiers, and encodes in batches.

1. **Device tier**: embeddings where the model computed them (GPU memory for a CUDA model),
   an LRU bounded in bytes (``TAPMASK_EMBEDDING_CACHE_MB``). A click on a cached image is a
   decode only.
2. **Host spill tier** (``TAPMASK_EMBEDDING_SPILL_MB``, default 0 = off): an embedding the device
   tier evicts moves to host memory instead of being dropped, if the model can move it
   (``MovesEmbeddings``); a later click moves it back, which costs a copy, not an encode.
3. **Shared tier** (``SharedEmbeddings``, e.g. ``RedisEmbeddingStore``): bytes shared between
   worker processes, so a follow-up click served by another worker does not re-encode.

``encode_many`` encodes the images a worker sees waiting in one batched pass where the model
supports it (``EncodesBatches``). A CUDA out-of-memory during an encode or decode becomes
``DeviceOutOfMemory`` (503) after the device tier is emptied, so the request fails clearly and
the process keeps serving (``guard_device_memory``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from backends.cache import LRUCache, nbytes
from backends.errors import DeviceOutOfMemory
from backends.models.base import (
    EncodesBatches,
    MovesEmbeddings,
    ReleasesMemory,
    Segmenter,
    SharesEmbeddings,
)

log = logging.getLogger(__name__)


class SharedEmbeddings(Protocol):
    """A second-tier embedding cache shared between processes (e.g. ``RedisEmbeddingStore``).

    It stores bytes; a model opts in by implementing ``backends.models.base.SharesEmbeddings``.
    Implementations must not raise for a lookup or store that fails (report a miss instead).
    """

    def get(self, model: str, image_key: str) -> bytes | None: ...

    def put(self, model: str, image_key: str, data: bytes) -> None: ...


def is_out_of_memory(exc: BaseException) -> bool:
    """A device out-of-memory error (``torch.cuda.OutOfMemoryError`` and its relatives), told
    apart without importing torch."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class EmbeddingCache:
    """The tiers above for every model of one Engine. Callers hold the model's lock."""

    def __init__(
        self,
        stats: Any,
        device_bytes: int,
        spill_bytes: int = 0,
        shared: SharedEmbeddings | None = None,
    ) -> None:
        """``stats``: the Engine's counters (``encodes``, ``encode_seconds``,
        ``batched_encodes``, ``shared_hits``, ``spill_hits``, ``out_of_memory``)."""
        self.device: LRUCache[Any] = LRUCache(device_bytes, "embeddings", on_evict=self._spill)
        self.host: LRUCache[Any] = LRUCache(spill_bytes, "embeddings-host")
        self.shared = shared
        self.stats = stats
        self._movers: dict[str, MovesEmbeddings] = {}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.device or key in self.host

    # -- lookups -----------------------------------------------------------------------------
    def get(self, name: str, model: Segmenter, key: str) -> Any | None:
        """The cached embedding from the device, host or shared tier, or None."""
        cache_key = (name, key)
        embedding = self.device.get(cache_key)
        if embedding is not None or cache_key in self.device:
            return embedding
        embedding = self._unspill(name, model, cache_key)
        if embedding is None:
            embedding = self._from_shared(name, model, key)
        if embedding is not None:
            self.device.put(cache_key, embedding, nbytes(embedding))
        return embedding

    def get_or_encode(self, name: str, model: Segmenter, key: str, image: np.ndarray) -> Any:
        cache_key = (name, key)
        if cache_key in self.device:
            return self.device.get(cache_key)
        embedding = self.get(name, model, key)
        if embedding is None:
            (embedding,) = self._encode(name, model, [(key, image)])
        return embedding

    def encode_many(
        self, name: str, model: Segmenter, items: Sequence[tuple[str, np.ndarray]], max_batch: int
    ) -> int:
        """Encode the images of ``items`` that no tier holds, ``max_batch`` per pass; returns
        how many were encoded."""
        todo: list[tuple[str, np.ndarray]] = []
        for key, image in items:
            if all(key != k for k, _ in todo) and self.get(name, model, key) is None:
                todo.append((key, image))
        for start in range(0, len(todo), max(1, max_batch)):
            self._encode(name, model, todo[start : start + max(1, max_batch)])
        return len(todo)

    # -- internals -----------------------------------------------------------------------------
    def _encode(
        self, name: str, model: Segmenter, items: Sequence[tuple[str, np.ndarray]]
    ) -> list[Any]:
        started = time.perf_counter()
        with guard_device_memory(self, model, f"encoding for {name}"):
            if len(items) > 1 and isinstance(model, EncodesBatches):
                embeddings = list(model.encode_batch([image for _, image in items]))
                self.stats.batched_encodes += len(items)
            else:
                embeddings = [model.encode(image) for _, image in items]
        self.stats.encodes += len(items)
        self.stats.encode_seconds += time.perf_counter() - started
        if isinstance(model, MovesEmbeddings):
            self._movers[name] = model
        for (key, _), embedding in zip(items, embeddings, strict=True):
            self._to_shared(name, model, key, embedding)
            self.device.put((name, key), embedding, nbytes(embedding))
        return embeddings

    def _spill(self, key: Hashable, embedding: Any) -> None:
        """Device-tier eviction: keep the embedding in host memory if there is room for it."""
        if self.host.max_bytes <= 0 or embedding is None or not isinstance(key, tuple):
            return
        mover = self._movers.get(key[0])
        if mover is None:
            return
        try:
            self.host.put(key, mover.embedding_to_host(embedding), nbytes(embedding))
        except Exception:  # spilling is an optimisation: never fail the request that evicted
            log.warning("could not spill the embedding of %s/%s", key[0], key[1][:12])

    def _unspill(self, name: str, model: Segmenter, cache_key: tuple[str, str]) -> Any | None:
        embedding = self.host.pop(cache_key)
        if embedding is None or not isinstance(model, MovesEmbeddings):
            return None
        with guard_device_memory(self, model, f"moving an embedding back for {name}"):
            embedding = model.embedding_to_device(embedding)
        self.stats.spill_hits += 1
        return embedding

    def _from_shared(self, name: str, model: Segmenter, key: str) -> Any | None:
        """The embedding from the shared tier, or None (no tier, model opts out, miss, error)."""
        if self.shared is None or not isinstance(model, SharesEmbeddings):
            return None
        try:
            data = self.shared.get(name, key)
            if data is None:
                return None
            embedding = model.embedding_from_bytes(data)
        except Exception:  # a corrupt or foreign entry is a miss, never a failed click
            log.warning("unusable shared embedding for %s/%s", name, key[:12], exc_info=True)
            return None
        self.stats.shared_hits += 1
        return embedding

    def _to_shared(self, name: str, model: Segmenter, key: str, embedding: Any) -> None:
        if self.shared is None or not isinstance(model, SharesEmbeddings) or embedding is None:
            return
        try:
            self.shared.put(name, key, model.embedding_to_bytes(embedding))
        except Exception:
            log.warning("could not share the embedding of %s/%s", name, key[:12], exc_info=True)

    def release_device_memory(self, model: Segmenter) -> None:
        """After an out-of-memory: empty the device tier (spilling what can be spilled) and let
        the model return its allocator's cached blocks."""
        for cache_key in self.device.snapshot_keys():
            embedding = self.device.pop(cache_key)
            self._spill(cache_key, embedding)
        if isinstance(model, ReleasesMemory):
            with contextlib.suppress(Exception):
                model.release_memory()


@contextlib.contextmanager
def guard_device_memory(cache: EmbeddingCache, model: Segmenter, what: str) -> Iterator[None]:
    """Turn a device out-of-memory inside the block into ``DeviceOutOfMemory`` (503), after
    freeing the device tier, so this request fails clearly and the next one has room."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        cache.stats.out_of_memory += 1
        log.error("device out of memory while %s: %s", what, exc)
        cache.release_device_memory(model)
        raise DeviceOutOfMemory(
            f"the device ran out of memory while {what}; cached embeddings were freed, "
            "retry the request (or give the worker a smaller TAPMASK_EMBEDDING_CACHE_MB)"
        ) from exc
