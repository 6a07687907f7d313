"""The Engine's embedding tiers as a GPU worker uses them: batched encodes of the images
waiting, a host spill tier behind a byte-bounded device tier, and an out-of-memory answered with
a clear 503 while the process keeps serving. Device memory itself cannot be exhausted on a CPU:
the out-of-memory is a real ``torch.cuda.OutOfMemoryError`` raised by the model (an injected
fault), the rest is the real Engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backends import images
from backends.engine import Engine, EngineConfig
from backends.errors import DeviceOutOfMemory
from backends.models.base import EncodesBatches, MovesEmbeddings, ReleasesMemory
from backends.prompts import Click, Prompt, Segmentation

KIB = 1 << 10


class Embedding:
    """An embedding that knows where it lives (as a tensor would)."""

    def __init__(self, values: np.ndarray, where: str = "device") -> None:
        self.values, self.where = values, where

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


class BatchingModel:
    name = "batching"
    replays_history = True

    def __init__(self) -> None:
        self.passes: list[int] = []  # images per encoder pass
        self.moves: list[str] = []
        self.released = 0
        self.fail_next: Exception | None = None

    def encode(self, image: np.ndarray) -> Embedding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images_: list[np.ndarray]) -> list[Embedding]:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.passes.append(len(images_))
        return [Embedding(np.full(256, float(i.mean()), np.float32)) for i in images_]

    def decode(self, image: np.ndarray, embedding: Embedding, prompt: Prompt, state: Any):
        assert embedding.where == "device", "decoded against an embedding left in host memory"
        mask = np.zeros(image.shape[:2], bool)
        mask[int(prompt.clicks[-1].y), int(prompt.clicks[-1].x)] = True
        return Segmentation(mask, float(embedding.values[0])), None

    def embedding_to_host(self, embedding: Embedding) -> Embedding:
        self.moves.append("host")
        return Embedding(embedding.values, "host")

    def embedding_to_device(self, embedding: Embedding) -> Embedding:
        self.moves.append("device")
        return Embedding(embedding.values, "device")

    def release_memory(self) -> None:
        self.released += 1


def _pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [
        images.encode_png(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_the_model_declares_the_capabilities():
    model = BatchingModel()
    assert isinstance(model, EncodesBatches)
    assert isinstance(model, MovesEmbeddings) and isinstance(model, ReleasesMemory)


def test_waiting_images_are_encoded_in_batches_and_then_each_click_is_a_decode():
    model = BatchingModel()
    engine = Engine({"m": model})
    pngs = _pngs(5)
    engine.prefetch("m", pngs[0])  # already cached: not encoded again
    assert engine.prefetch_many("m", [*pngs, pngs[1]], max_batch=3) == 4
    assert model.passes == [1, 3, 1]
    assert engine.stats.batched_encodes == 3 and engine.stats.encodes == 5
    for png in pngs:
        engine.segment("m", png, Prompt((Click(3, 3),)))
    assert engine.stats.encodes == 5 and model.passes == [1, 3, 1]
    assert engine.prefetch_many("m", pngs) == 0


def test_device_evictions_spill_to_host_and_come_back_without_an_encode():
    model = BatchingModel()
    config = EngineConfig(embedding_cache_bytes=2 * KIB, embedding_spill_bytes=4 * KIB)
    engine = Engine({"m": model}, config=config)
    pngs = _pngs(4)  # 1 KiB embeddings: two fit on the device, the others spill
    for png in pngs:
        engine.prefetch("m", png)
    assert len(engine.embeddings) == 2 and len(engine.embedding_cache.host) == 2
    assert model.moves == ["host", "host"]
    result = engine.segment("m", pngs[0], Prompt((Click(4, 4),)))  # spilled: moved back
    assert result.mask[4, 4]
    assert engine.stats.encodes == 4 and engine.stats.spill_hits == 1
    # moved back to the device, which pushed the least recently used one out to the host
    assert model.moves[2:] == ["device", "host"] and engine.embeddings.bytes <= 2 * KIB


def test_without_a_spill_tier_an_evicted_embedding_is_encoded_again():
    model = BatchingModel()
    engine = Engine({"m": model}, config=EngineConfig(embedding_cache_bytes=2 * KIB))
    pngs = _pngs(3)
    for png in pngs:
        engine.prefetch("m", png)
    engine.segment("m", pngs[0], Prompt((Click(4, 4),)))
    assert engine.stats.encodes == 4 and model.moves == []


def test_out_of_memory_answers_503_frees_the_device_tier_and_the_next_click_works():
    torch = pytest.importorskip("torch")
    model = BatchingModel()
    config = EngineConfig(embedding_cache_bytes=8 * KIB, embedding_spill_bytes=8 * KIB)
    engine = Engine({"m": model}, config=config)
    pngs = _pngs(3)
    engine.prefetch("m", pngs[0])
    model.fail_next = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(DeviceOutOfMemory) as info:
        engine.segment("m", pngs[1], Prompt((Click(2, 2),)))
    assert info.value.status == 503 and info.value.code == "device_out_of_memory"
    assert "out of memory" in str(info.value)
    assert model.released == 1 and engine.stats.out_of_memory == 1
    assert len(engine.embeddings) == 0 and len(engine.embedding_cache.host) == 1  # spilled
    assert engine.segment("m", pngs[1], Prompt((Click(2, 2),))).mask[2, 2]  # serves on
    assert engine.segment("m", pngs[0], Prompt((Click(1, 1),))).mask[1, 1]  # from the spill
