"""SAM backend on a tiny random-weights model (fast on CPU), and the weights downloader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from backends import weights
from backends.errors import ModelLoadError, ModelNotFound
from backends.prompts import Box, Click, Prompt
from tests.conftest import TINY_SAM

# --------------------------------------------------------------------------------------------
# weights.py (no torch, no network)


def test_download_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"sam-vit_x.*sam-vit_b, sam-vit_h, sam-vit_l"):
        weights.download("sam-vit_x", tmp_path)


def _local_table(tmp_path: Path, payload: bytes, sha: str) -> dict[str, weights.WeightFile]:
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    return {"fake": weights.WeightFile(source.as_uri(), "fake.pth", sha, len(payload))}


def test_download_checksum_mismatch_deletes_the_temp_file(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    table = _local_table(tmp_path, b"not the model", "0" * 64)
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        weights.download("fake", dest, table=table, progress=False)
    assert list(dest.iterdir()) == []


def test_download_verifies_and_renames(tmp_path: Path) -> None:
    payload = b"model bytes" * 1000
    table = _local_table(tmp_path, payload, hashlib.sha256(payload).hexdigest())
    path = weights.download("fake", tmp_path / "models", table=table, progress=False)
    assert path == tmp_path / "models" / "fake.pth"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["fake.pth"]


def test_official_table() -> None:
    assert weights.names() == ["sam-vit_b", "sam-vit_h", "sam-vit_l"]
    for name, entry in weights.OFFICIAL_WEIGHTS.items():
        assert entry.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
        assert entry.url.endswith("/" + entry.filename)
        assert name.removeprefix("sam-") in entry.filename
        assert len(entry.sha256) == 64


# --------------------------------------------------------------------------------------------
# SAM


@pytest.fixture(scope="module")
def sam():
    from backends.models.sam import loader

    return loader


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_sam_checkpoint: Path) -> Path:
    return tiny_sam_checkpoint


@pytest.fixture(scope="module")
def segmenter(sam, tiny_checkpoint):
    return sam.build("sam", checkpoint=tiny_checkpoint, device="cpu", architecture=TINY_SAM)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(200, 300, 3), dtype=np.uint8)
    img[50:150, 80:220] = rng.integers(180, 255, size=(100, 140, 3), dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def embedding(segmenter, image):
    return segmenter.encode(image)


def test_embedding(segmenter, embedding) -> None:
    assert embedding.original_size == (200, 300)
    assert embedding.input_size == (683, 1024)
    assert [tuple(t.shape) for t in embedding.tensors] == [(1, 32, 64, 64)]
    [array] = embedding.to_numpy()
    assert array.dtype == np.float32 and array.shape == (1, 32, 64, 64)
    assert embedding.nbytes == array.nbytes == 32 * 64 * 64 * 4
    exported = segmenter.export_embedding(embedding)
    np.testing.assert_array_equal(exported, array)
    assert exported.dtype == np.float32


def test_shared_embedding_round_trip(segmenter, embedding) -> None:
    import torch

    data = segmenter.embedding_to_bytes(embedding)
    assert len(data) < embedding.nbytes // 2 + 1024  # fp16
    restored = segmenter.embedding_from_bytes(data)
    assert restored.original_size == embedding.original_size
    assert restored.input_size == embedding.input_size
    [before], [after] = embedding.tensors, restored.tensors
    assert after.dtype == torch.float32 and after.shape == before.shape
    assert float((before - after).abs().max()) <= 1e-3 * float(before.abs().max()) + 1e-7
    with pytest.raises(ValueError, match="truncated"):
        segmenter.embedding_from_bytes(data[:-2])


def test_click_gives_full_size_mask(segmenter, image, embedding) -> None:
    seg, state = segmenter.decode(image, embedding, Prompt((Click(150, 100),)), None)
    assert seg.mask.shape == (200, 300) and seg.mask.dtype == bool
    assert isinstance(seg.score, float) and np.isfinite(seg.score)
    assert seg.model == "sam"
    assert state.shape == (1, 1, 256, 256) and state.dtype == np.float32


def test_box_alone_gives_mask_with_single_output(segmenter, image, embedding, monkeypatch) -> None:
    calls = _spy(monkeypatch, segmenter.model.mask_decoder)
    seg, state = segmenter.decode(image, embedding, Prompt(box=Box(80, 50, 220, 150)), None)
    assert seg.mask.shape == (200, 300)
    assert calls[-1]["multimask_output"] is False
    assert state.shape == (1, 1, 256, 256)


def _spy(monkeypatch, module) -> list[dict]:
    """Record the keyword arguments of every ``module.forward`` call."""
    calls: list[dict] = []
    original = module.forward

    def forward(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


def test_first_click_multimask_then_mask_input(segmenter, image, embedding, monkeypatch) -> None:
    decoder_calls = _spy(monkeypatch, segmenter.model.mask_decoder)
    prompt_calls = _spy(monkeypatch, segmenter.model.prompt_encoder)
    outputs: list = []
    original_decoder = segmenter.model.mask_decoder.forward

    def keep_outputs(*args, **kwargs):
        result = original_decoder(*args, **kwargs)
        outputs.append(result)
        return result

    monkeypatch.setattr(segmenter.model.mask_decoder, "forward", keep_outputs)

    first = Prompt((Click(150, 100),))
    seg1, state1 = segmenter.decode(image, embedding, first, None)
    assert decoder_calls[0]["multimask_output"] is True
    assert prompt_calls[0]["masks"] is None
    low_res, iou = outputs[0]
    assert tuple(iou.shape) == (1, 3)
    best = int(iou[0].argmax())
    assert seg1.score == pytest.approx(float(iou[0, best]))
    np.testing.assert_array_equal(state1[0, 0], low_res[0, best].numpy())

    second = Prompt((Click(150, 100), Click(90, 60, positive=False)))
    _seg2, state2 = segmenter.decode(image, embedding, second, state1)
    assert decoder_calls[1]["multimask_output"] is False
    mask_input = prompt_calls[1]["masks"]
    assert mask_input is not None
    np.testing.assert_array_equal(mask_input.numpy(), state1)
    assert state2.shape == (1, 1, 256, 256)


def test_decode_does_not_rerun_the_encoder(segmenter, image, monkeypatch) -> None:
    calls = _spy(monkeypatch, segmenter.model.image_encoder)
    before = segmenter.encode_calls
    emb = segmenter.encode(image)
    _, state = segmenter.decode(image, emb, Prompt((Click(150, 100),)), None)
    segmenter.decode(image, emb, Prompt((Click(150, 100), Click(100, 70))), state)
    segmenter.decode(image, emb, Prompt(box=Box(10, 10, 100, 100)), None)
    assert len(calls) == 1
    assert segmenter.encode_calls == before + 1


def test_matches_sam_predictor(segmenter, image, embedding) -> None:
    from segment_anything import SamPredictor

    predictor = SamPredictor(segmenter.model)
    predictor.set_image(image)
    np.testing.assert_array_equal(
        predictor.get_image_embedding().numpy(), segmenter.export_embedding(embedding)
    )

    clicks = (Click(150, 100), Click(90, 60, positive=False))
    coords = np.array([[c.x, c.y] for c in clicks])
    labels = np.array([int(c.positive) for c in clicks])

    masks, scores, low_res = predictor.predict(coords[:1], labels[:1], multimask_output=True)
    best = int(np.argmax(scores))
    seg1, state1 = segmenter.decode(image, embedding, Prompt(clicks[:1]), None)
    np.testing.assert_array_equal(seg1.mask, masks[best])
    assert seg1.score == pytest.approx(float(scores[best]), abs=1e-5)
    assert 0 < seg1.mask.sum() < seg1.mask.size  # not a trivial comparison

    masks2, scores2, _ = predictor.predict(
        coords, labels, mask_input=low_res[best][None], multimask_output=False
    )
    seg2, _ = segmenter.decode(image, embedding, Prompt(clicks), state1)
    np.testing.assert_array_equal(seg2.mask, masks2[0])
    assert seg2.score == pytest.approx(float(scores2[0]), abs=1e-5)

    box = Box(80, 50, 220, 150)
    masks3, scores3, _ = predictor.predict(box=np.array(box.as_xyxy()), multimask_output=False)
    seg3, _ = segmenter.decode(image, embedding, Prompt(box=box), None)
    np.testing.assert_array_equal(seg3.mask, masks3[0])
    assert seg3.score == pytest.approx(float(scores3[0]), abs=1e-5)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_caller_mask_becomes_low_res_logits_where_it_lies(segmenter, embedding) -> None:
    """The mask input is SAM's own geometry run backwards: upscaling its logits the way SAM
    upscales an answer gives the caller's mask back (off by the 4× downscale on the edges)."""
    mask = np.zeros((200, 300), bool)
    mask[40:120, 150:260] = True
    logits = segmenter.mask_logits(mask, embedding)
    assert tuple(logits.shape) == (1, 1, 256, 256)
    assert float(logits.max()) == pytest.approx(10.0) and float(logits.min()) == -10.0
    back = segmenter.backbone.upscale(logits, embedding)
    assert _mask_iou(back, mask) > 0.95
    # The padding below the image (683 of 1024 rows are image) is outside: negative logits.
    assert float(logits[0, 0, 180:].max()) == -10.0


def test_a_caller_mask_is_the_first_decode_s_mask_input(segmenter, image, embedding) -> None:
    clicks = (Click(150, 100),)
    plain, _ = segmenter.decode(image, embedding, Prompt(clicks), None)
    mask = np.zeros((200, 300), bool)
    mask[50:150, 80:220] = True
    refined, state = segmenter.decode(image, embedding, Prompt(clicks, previous_mask=mask), None)
    assert not np.array_equal(plain.mask, refined.mask)
    assert state.shape == (1, 1, 256, 256)
    # The same as continuing from a state that holds the mask's logits.
    logits = segmenter.mask_logits(mask, embedding).numpy()
    continued, _ = segmenter.decode(image, embedding, Prompt(clicks), logits)
    np.testing.assert_array_equal(refined.mask, continued.mask)


def test_encode_rejects_non_rgb(segmenter) -> None:
    from backends.errors import ImageError

    with pytest.raises(ImageError):
        segmenter.encode(np.zeros((10, 10, 3), dtype=np.float32))


@pytest.mark.parametrize("model_type, width", [("vit_b", 768), ("vit_l", 1024), ("vit_h", 1280)])
def test_official_architectures_and_type_inference(sam, model_type, width) -> None:
    import torch
    from segment_anything import sam_model_registry

    from backends.models.sizes import SAM_VIT_SIZES, sam_variant

    with torch.device("meta"):  # shapes only: no memory, no init time
        official = sam_model_registry[model_type](checkpoint=None).state_dict()
        ours = sam.build_sam_model(SAM_VIT_SIZES[model_type]).state_dict()
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in ours.items()}
    assert official["image_encoder.patch_embed.proj.weight"].shape[0] == width
    assert sam_variant(official) == model_type


def test_type_inference_errors() -> None:
    import torch

    from backends.models.sizes import sam_variant

    fake = torch.empty((1280, 3, 16, 16), device="meta")
    assert sam_variant({"image_encoder.patch_embed.proj.weight": fake}) == "vit_h"
    with pytest.raises(ModelLoadError, match="width 32"):
        sam_variant(
            {"image_encoder.patch_embed.proj.weight": torch.empty((32, 3, 16, 16), device="meta")}
        )
    with pytest.raises(ModelLoadError, match="patch_embed"):
        sam_variant({})


def test_architecture_from_options_is_checked() -> None:
    import dataclasses

    from backends.models.sizes import SAM_VIT_SIZES, SamArchitecture

    vit_b = SAM_VIT_SIZES["vit_b"]
    assert SamArchitecture.of(vit_b) is vit_b
    assert SamArchitecture.of(dataclasses.asdict(vit_b)) == vit_b
    assert SamArchitecture.of(TINY_SAM).encoder_global_attn_indexes == ()
    with pytest.raises(ModelLoadError, match="bad SAM architecture"):
        SamArchitecture.of({**TINY_SAM, "encoder_width": 3})
    with pytest.raises(ModelLoadError, match="bad SAM architecture"):
        SamArchitecture.of({"encoder_depth": 1})


def test_tiny_checkpoint_without_architecture_is_refused(sam, tiny_checkpoint) -> None:
    with pytest.raises(ModelLoadError, match="width 32"):
        sam.build("sam", checkpoint=tiny_checkpoint, device="cpu")


def test_wrong_variant_is_refused(sam, tmp_path) -> None:
    import torch

    path = tmp_path / "b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 1, 1)}, path)
    with pytest.raises(ModelLoadError, match=r"holds a vit_b model.*needs vit_h"):
        sam.build("sam-vit_h", model_type="vit_h", checkpoint=path, device="cpu")


def test_strict_loading_names_missing_and_extra_keys(sam, tiny_checkpoint, tmp_path) -> None:
    import torch

    state = torch.load(tiny_checkpoint, weights_only=True)
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ModelLoadError, match=r"missing keys: mask_decoder\.iou_token\.weight"):
        sam.build(checkpoint=tmp_path / "missing.pth", device="cpu", architecture=TINY_SAM)

    extra = dict(state)
    extra["mask_decoder.surprise"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ModelLoadError, match=r"unexpected keys: mask_decoder\.surprise"):
        sam.build(checkpoint=tmp_path / "extra.pth", device="cpu", architecture=TINY_SAM)

    reshaped = dict(state)
    reshaped["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ModelLoadError, match=r"shape mismatches.*iou_token"):
        sam.build(checkpoint=tmp_path / "reshaped.pth", device="cpu", architecture=TINY_SAM)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(sam, tiny_checkpoint, tmp_path) -> None:
    import torch

    state = dict(torch.load(tiny_checkpoint, weights_only=True))
    state["payload"] = _NotATensor()
    path = tmp_path / "pickled.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"weights_only") as info:
        sam.build(checkpoint=path, device="cpu", architecture=TINY_SAM)
    assert str(path) in str(info.value)


def test_garbage_and_non_dict_files_are_refused(sam, tmp_path) -> None:
    import torch

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"garbage\.pth"):
        sam.build(checkpoint=garbage, device="cpu", architecture=TINY_SAM)

    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        sam.build(checkpoint=listed, device="cpu", architecture=TINY_SAM)


def test_missing_checkpoint_names_the_path(sam, tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelLoadError, match=r"nope\.pth.*tapmask weights sam-vit_h"):
        sam.build("sam", checkpoint=missing)

    monkeypatch.delenv("SAM_CHECKPOINT", raising=False)
    monkeypatch.setenv("TAPMASK_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ModelLoadError, match=r"sam_vit_b_01ec64\.pth.*tapmask weights sam-vit_b"):
        sam.build("sam-vit_b", model_type="vit_b")

    monkeypatch.setenv("SAM_CHECKPOINT", str(tmp_path / "env.pth"))
    with pytest.raises(ModelLoadError, match=r"env\.pth"):
        sam.build("sam")


def test_registry_builds_through_sam_module(sam, tiny_checkpoint) -> None:
    from backends.models import registry

    model = registry.create("sam", checkpoint=tiny_checkpoint, device="cpu", architecture=TINY_SAM)
    assert model.name == "sam" and model.replays_history is True
    from backends.models.base import ExportsEmbedding, Segmenter, SharesEmbeddings, accepts_box

    assert isinstance(model, Segmenter)
    assert isinstance(model, SharesEmbeddings) and isinstance(model, ExportsEmbedding)
    assert accepts_box(model)
    with pytest.raises(ModelLoadError, match="not found"):
        registry.create("sam-vit_l", checkpoint=tiny_checkpoint.with_name("absent.pth"))


def test_random_weights_must_be_explicit(sam, tiny_checkpoint) -> None:
    with pytest.raises(ModelLoadError, match="mutually exclusive"):
        sam.build(checkpoint=tiny_checkpoint, random_weights=True, architecture=TINY_SAM)
    model = sam.build("tiny", random_weights=True, architecture=TINY_SAM, device="cpu")
    assert model.checkpoint is None and model.name == "tiny"
