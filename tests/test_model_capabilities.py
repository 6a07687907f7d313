"""The optional model capabilities of ``backends.models.base``, as the Engine uses them: a model
that declares a capability gets it used, one that does not is never asked for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backends import images
from backends.engine import Engine
from backends.errors import TapmaskError
from backends.models.base import ExportsEmbedding, Segmenter, SharesEmbeddings, accepts_box
from backends.prompts import Box, Click, Prompt, Segmentation


class PlainModel:
    """The protocol alone: no shared bytes, no export, boxes accepted by default."""

    name = "plain"
    replays_history = True

    def __init__(self) -> None:
        self.encodes = 0
        self.decoded: list[int] = []  # clicks per decoded prompt, in order

    def encode(self, image: np.ndarray) -> np.ndarray:
        self.encodes += 1
        return np.full(16, float(image.mean()), np.float32)

    def decode(self, image: np.ndarray, embedding: Any, prompt: Prompt, state: Any):
        self.decoded.append(len(prompt.clicks))
        return Segmentation(np.zeros(image.shape[:2], bool), 0.5), len(prompt.clicks)


class CapableModel(PlainModel):
    name = "capable"

    def embedding_to_bytes(self, embedding: np.ndarray) -> bytes:
        return embedding.astype(np.float16).tobytes()

    def embedding_from_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.float16).astype(np.float32)

    def export_embedding(self, embedding: np.ndarray) -> np.ndarray:
        return embedding.reshape(1, 4, 4)


class ClicksOnlyModel(PlainModel):
    name = "clicks-only"
    accepts_box = False


class Shared:
    def __init__(self) -> None:
        self.data: dict = {}

    def get(self, model: str, key: str) -> bytes | None:
        return self.data.get((model, key))

    def put(self, model: str, key: str, data: bytes) -> None:
        self.data[(model, key)] = data


def _png() -> bytes:
    rng = np.random.default_rng(0)
    return images.encode_png(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))


def test_protocols_see_what_a_model_declares():
    plain, capable, clicks_only = PlainModel(), CapableModel(), ClicksOnlyModel()
    assert all(isinstance(m, Segmenter) for m in (plain, capable, clicks_only))
    assert not isinstance(plain, SharesEmbeddings) and not isinstance(plain, ExportsEmbedding)
    assert isinstance(capable, SharesEmbeddings) and isinstance(capable, ExportsEmbedding)
    assert accepts_box(plain) and accepts_box(capable) and not accepts_box(clicks_only)


def test_shared_tier_only_for_models_that_share():
    shared = Shared()
    png = _png()
    first = Engine({"plain": PlainModel(), "capable": CapableModel()}, shared_embeddings=shared)
    first.segment("plain", png, Prompt((Click(5, 5),)))
    first.segment("capable", png, Prompt((Click(5, 5),)))
    assert [model for model, _ in shared.data] == ["capable"]

    plain, capable = PlainModel(), CapableModel()
    second = Engine({"plain": plain, "capable": capable}, shared_embeddings=shared)
    second.segment("plain", png, Prompt((Click(5, 5),)))
    second.segment("capable", png, Prompt((Click(5, 5),)))
    assert plain.encodes == 1 and capable.encodes == 0
    assert second.stats.shared_hits == 1


def test_export_needs_the_capability():
    engine = Engine({"plain": PlainModel(), "capable": CapableModel()})
    assert engine.export_embedding("capable", _png()).shape == (1, 4, 4)
    with pytest.raises(TapmaskError, match="no exportable image embedding"):
        engine.export_embedding("plain", _png())


def test_a_model_without_boxes_replays_from_its_first_click():
    plain, clicks_only = PlainModel(), ClicksOnlyModel()
    engine = Engine({"plain": plain, "clicks-only": clicks_only})
    prompt = Prompt((Click(5, 5), Click(9, 9, False)), Box(1, 1, 20, 20))
    engine.segment("plain", _png(), prompt)
    engine.segment("clicks-only", _png(), prompt)
    assert plain.decoded == [0, 1, 2]  # the box alone is the first step
    assert clicks_only.decoded == [1, 2]
