"""Test-only models for the Redis worker tests, loaded into worker processes as a plugin.

``tapmask worker --plugin tests.support.queue_models --models test-counting`` imports
this module, which registers the names below in the model registry, so the worker loads them through
``Engine.load`` exactly like real models. Each model reports what it does to the Redis in
``$TAPMASK_TEST_REDIS_URL`` (encode counts, a start log), because the worker is another process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import redis

from backends.models.registry import ModelSpec, register
from backends.prompts import Prompt, Segmentation


class ReportingModel:
    """Deterministic: the mask is the positive click pixels; embeddings are 1000 floats."""

    replays_history = True

    def __init__(self, name: str, encode_seconds: float = 0.0) -> None:
        self.name = name
        self.encode_seconds = encode_seconds
        url = os.environ.get("TAPMASK_TEST_REDIS_URL")
        self.redis = redis.Redis.from_url(url) if url else None

    def _report(self, what: str) -> None:
        if self.redis is not None:
            self.redis.incr(f"test:{what}:{self.name}")
            self.redis.rpush(f"test:log:{self.name}", f"{what} {os.getpid()}")

    def encode(self, image: np.ndarray) -> np.ndarray:
        self._report("encode-start")
        time.sleep(self.encode_seconds)
        self._report("encodes")
        return np.full(1000, float(image.mean()), np.float32)

    def decode(self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any):
        mask = np.zeros(image.shape[:2], bool)
        for click in prompt.positives:
            mask[int(click.y), int(click.x)] = True
        return Segmentation(mask, 0.5 + 0.01 * len(prompt.clicks)), len(prompt.clicks)

    def export_embedding(self, embedding: np.ndarray) -> np.ndarray:
        return embedding.reshape(1, 10, 10, 10)

    def embedding_to_bytes(self, embedding: np.ndarray) -> bytes:
        return embedding.astype(np.float16).tobytes()

    def embedding_from_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.float16).astype(np.float32)


class BatchingModel(ReportingModel):
    """Encodes several images per pass (``EncodesBatches``) and logs each pass's size."""

    def encode_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.redis is not None:
            self.redis.rpush(f"test:passes:{self.name}", len(images))
        time.sleep(self.encode_seconds)
        for _ in images:
            self._report("encodes")
        return [np.full(1000, float(image.mean()), np.float32) for image in images]

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encode_batch([image])[0]


def build(name: str, device: str | None = None, encode_seconds: float = 0.0) -> ReportingModel:
    return ReportingModel(name, encode_seconds)


def build_batching(name: str, device: str | None = None) -> BatchingModel:
    return BatchingModel(name, 0.2)


register(ModelSpec("test-batching", "tests.support.queue_models:build_batching", "test: batches"))
register(ModelSpec("test-counting", "tests.support.queue_models:build", "test: counts encodes"))
register(ModelSpec("test-shared", "tests.support.queue_models:build", "test: counts encodes"))
register(
    ModelSpec(
        "test-snooze",
        "tests.support.queue_models:build",
        "test: 3 s encodes (job timeout)",
        kwargs=(("encode_seconds", 3.0),),
    )
)
register(
    ModelSpec(
        "test-slow",
        "tests.support.queue_models:build",
        "test: 0.4 s encodes",
        kwargs=(("encode_seconds", 0.4),),
    )
)
register(
    ModelSpec(
        "test-sleepy",
        "tests.support.queue_models:build",
        "test: 2 s encodes (killed mid-job)",
        kwargs=(("encode_seconds", 2.0),),
    )
)


def touch(path: str) -> None:
    """What a smuggled job would run if the worker executed it (it must not)."""
    with open(path, "w") as handle:
        handle.write("executed")
