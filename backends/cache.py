"""Thread-safe LRU caches bounded by the bytes of what they hold.

Embeddings differ a lot in size (SAM ViT: 4 MiB per image; SAM 2 adds high-resolution feature
maps; GrabCut: nothing), so the bound is in bytes, measured from the objects themselves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")

_OBJECT_OVERHEAD = 64


def nbytes(value: Any) -> int:
    """Real memory held by ``value``: numpy arrays, torch tensors (duck-typed), containers."""
    if value is None:
        return 0
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    own = getattr(value, "nbytes", None)
    if isinstance(own, int):
        return own
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch.Tensor
        return int(value.element_size() * value.numel())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, dict):
        return _OBJECT_OVERHEAD + sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return _OBJECT_OVERHEAD + sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return _OBJECT_OVERHEAD + sum(nbytes(v) for v in vars(value).values())
    return _OBJECT_OVERHEAD


@dataclass
class CacheStats:
    """Counters (since start) and sizes (now), as ``/metrics`` and ``tapmask workers`` show them."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0  # entries pushed out by the byte bound (not pops or clears)
    entries: int = 0  # held now
    bytes: int = 0  # held now


class LRUCache(Generic[V]):
    """An LRU mapping bounded by total bytes (an entry larger than the bound is not kept)."""

    def __init__(
        self,
        max_bytes: int,
        name: str = "cache",
        on_evict: Callable[[Hashable, V], None] | None = None,
    ) -> None:
        """``on_evict(key, value)`` is called, outside the lock, for each entry pushed out by
        the byte bound (not for ``pop``/``clear``): a second tier can take it."""
        self.max_bytes = int(max_bytes)
        self.name = name
        self.on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: V, size: int | None = None) -> None:
        size = nbytes(value) if size is None else int(size)
        evicted: list[tuple[Hashable, V]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                self._update_stats()
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                evicted_key, (evicted_value, evicted_size) = self._items.popitem(last=False)
                self._bytes -= evicted_size
                self.stats.evictions += 1
                evicted.append((evicted_key, evicted_value))
            self._update_stats()
        if self.on_evict is not None:
            for evicted_key, evicted_value in evicted:
                self.on_evict(evicted_key, evicted_value)

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            self._update_stats()
            return item[0]

    def snapshot_keys(self) -> list[Hashable]:
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self._update_stats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _update_stats(self) -> None:
        self.stats.entries = len(self._items)
        self.stats.bytes = self._bytes
