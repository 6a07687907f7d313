"""Prometheus metrics for the backend (``GET /metrics``), one registry per app."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        hits = CounterMetricFamily("tapmask_cache_hits", "cache hits", labels=["cache"])
        misses = CounterMetricFamily("tapmask_cache_misses", "cache misses", labels=["cache"])
        size = GaugeMetricFamily("tapmask_cache_bytes", "bytes held", labels=["cache"])
        entries = GaugeMetricFamily("tapmask_cache_entries", "entries held", labels=["cache"])
        for cache, values in stats.items():
            hits.add_metric([cache], values.get("hits", 0))
            misses.add_metric([cache], values.get("misses", 0))
            size.add_metric([cache], values.get("bytes", 0))
            entries.add_metric([cache], values.get("entries", 0))
        yield hits
        yield misses
        yield size
        yield entries


class Metrics:
    def __init__(self, cache_stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tapmask_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tapmask_request_seconds",
            "request latency",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
            registry=self.registry,
        )
        self.errors = Counter(
            "tapmask_errors", "errors answered, by code", ["code"], registry=self.registry
        )
        self.registry.register(_CacheCollector(cache_stats))
