"""Engine and caches: what a user notices is that later clicks do not redo the expensive work."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from backends import images
from backends.cache import LRUCache, nbytes
from backends.engine import Engine, EngineConfig
from backends.errors import ModelLoadError, ModelNotFound, PromptError, UnknownImage
from backends.prompts import Box, Click, Prompt, Segmentation
from tests.conftest import TINY_SAM


class CountingModel:
    """A deterministic model that records what the Engine asks of it."""

    def __init__(self, replays_history: bool = True, encode_seconds: float = 0.0) -> None:
        self.name = "counting"
        self.replays_history = replays_history
        self.encode_seconds = encode_seconds
        self.encodes = 0
        self.decodes: list[tuple[tuple, Any]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def encode(self, image: np.ndarray) -> np.ndarray:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.encode_seconds)
        self.encodes += 1
        with self._lock:
            self.active -= 1
        return np.zeros(1000, np.float32)

    def decode(self, image, embedding, prompt: Prompt, state):
        self.decodes.append((prompt.key(), state))
        mask = np.zeros(image.shape[:2], bool)
        for click in prompt.positives:
            mask[int(click.y), int(click.x)] = True
        return Segmentation(mask, 0.5), len(prompt.clicks)


def _png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return images.encode_png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_second_click_reuses_embedding_and_continues_from_previous_state():
    model = CountingModel()
    engine = Engine({"m": model})
    image = _png()
    engine.segment("m", image, Prompt((Click(5, 5),)))
    engine.segment("m", image, Prompt((Click(5, 5), Click(9, 9, False))))
    assert model.encodes == 1
    assert len(model.decodes) == 2
    assert model.decodes[1][1] == 1  # state of the first click was handed over


def test_missing_history_is_replayed_in_order():
    model = CountingModel()
    engine = Engine({"m": model})
    clicks = (Click(1, 1), Click(2, 2, False), Click(3, 3))
    engine.segment("m", _png(), Prompt(clicks))
    assert [len(key[1]) for key, _ in model.decodes] == [1, 2, 3]
    assert [state for _, state in model.decodes] == [None, 1, 2]


def test_box_is_the_first_step_of_a_replayed_interaction():
    model = CountingModel()
    engine = Engine({"m": model})
    engine.segment("m", _png(), Prompt((Click(3, 3),), Box(1, 1, 20, 20)))
    assert [len(key[1]) for key, _ in model.decodes] == [0, 1]


def test_repeated_request_is_served_from_the_state_cache():
    model = CountingModel()
    engine = Engine({"m": model})
    prompt = Prompt((Click(5, 5),))
    first = engine.segment("m", _png(), prompt)
    again = engine.segment("m", _png(), prompt)
    assert len(model.decodes) == 1 and np.array_equal(first.mask, again.mask)


def test_undo_continues_from_the_cached_prefix():
    model = CountingModel()
    engine = Engine({"m": model})
    a, b, c = Click(1, 1), Click(2, 2), Click(3, 3)
    engine.segment("m", _png(), Prompt((a, b)))
    engine.segment("m", _png(), Prompt((a, c)))  # click b removed, c added
    assert len(model.decodes) == 3 and model.decodes[-1][1] == 1


def test_models_without_history_decode_once_with_the_previous_state():
    model = CountingModel(replays_history=False)
    engine = Engine({"m": model})
    engine.segment("m", _png(), Prompt((Click(1, 1), Click(2, 2))))
    assert len(model.decodes) == 1 and model.decodes[0][1] is None
    engine.segment("m", _png(), Prompt((Click(1, 1), Click(2, 2), Click(3, 3))))
    assert model.decodes[-1][1] == 2


def test_concurrent_first_clicks_encode_once_and_never_overlap():
    model = CountingModel(encode_seconds=0.2)
    engine = Engine({"m": model})
    image = _png()
    errors: list[BaseException] = []

    def click(i: int) -> None:
        try:
            engine.segment("m", image, Prompt((Click(i, i),)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert model.encodes == 1 and model.max_active == 1 and len(model.decodes) == 6


def test_embedding_cache_is_bounded_in_bytes():
    model = CountingModel()  # 4000-byte embeddings
    engine = Engine({"m": model}, EngineConfig(embedding_cache_bytes=10_000))
    for seed in range(4):
        engine.segment("m", _png(seed=seed), Prompt((Click(1, 1),)))
    assert engine.embeddings.bytes <= 10_000 and len(engine.embeddings) == 2
    engine.segment("m", _png(seed=0), Prompt((Click(1, 1), Click(2, 2))))
    assert model.encodes == 5  # evicted image 0 had to be encoded again


def test_image_by_key_and_errors():
    model = CountingModel()
    engine = Engine({"m": model})
    key = engine.put_image(_png())
    assert engine.segment("m", key, Prompt((Click(1, 1),))).mask.shape == (30, 40)
    with pytest.raises(UnknownImage):
        engine.segment("m", "0" * 64, Prompt((Click(1, 1),)))
    with pytest.raises(ModelNotFound, match="served: m"):
        engine.segment("nope", key, Prompt((Click(1, 1),)))
    with pytest.raises(PromptError, match="outside"):
        engine.segment("m", key, Prompt((Click(400, 1),)))


def test_unknown_model_option_is_a_load_error():
    with pytest.raises(ModelLoadError, match="checkpoint"):
        Engine().load(["grabcut"], checkpoint="x.pth")
    with pytest.raises(ModelNotFound, match="grabcut"):
        Engine().load(["no-such-model"])


def test_lru_and_nbytes():
    cache: LRUCache[bytes] = LRUCache(10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    assert cache.get("a") == b"12345"  # a is now most recent
    cache.put("c", b"123")
    assert cache.get("b") is None and cache.get("a") is not None
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None
    assert nbytes({"x": np.zeros(10, np.float32), "y": [b"ab"]}) >= 42


# -- SAM through the Engine (tiny random-weights model, real segment-anything code) ------------


@pytest.fixture(scope="module")
def sam_engine(tiny_sam_checkpoint):
    engine = Engine()
    engine.load(["sam"], checkpoint=tiny_sam_checkpoint, device="cpu", architecture=TINY_SAM)
    return engine


def test_sam_second_click_does_not_run_the_image_encoder(sam_engine, monkeypatch):
    model = sam_engine.model("sam").model
    calls = {"encoder": 0, "mask_input": []}
    encoder_forward = model.image_encoder.forward
    prompt_forward = model.prompt_encoder.forward

    def counting_encoder(*args, **kwargs):
        calls["encoder"] += 1
        return encoder_forward(*args, **kwargs)

    def spying_prompt_encoder(points, boxes, masks):
        calls["mask_input"].append(masks)
        return prompt_forward(points, boxes, masks)

    monkeypatch.setattr(model.image_encoder, "forward", counting_encoder)
    monkeypatch.setattr(model.prompt_encoder, "forward", spying_prompt_encoder)
    image = _png(320, 240, seed=3)
    sam_engine.segment("sam", image, Prompt((Click(100, 100),)))
    assert calls["encoder"] == 1 and calls["mask_input"] == [None]
    second = sam_engine.segment("sam", image, Prompt((Click(100, 100), Click(200, 50, False))))
    assert calls["encoder"] == 1  # no re-encode on the follow-up click
    assert calls["mask_input"][1] is not None  # previous low-res logits were fed back
    assert tuple(calls["mask_input"][1].shape) == (1, 1, 256, 256)
    assert second.mask.shape == (240, 320)
