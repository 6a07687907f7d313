"""transformers model families (SAM 2.1, HQ-SAM, EdgeTAM, SAM in HF format) on tiny random models.

Every model is built from a tiny config, saved with ``save_pretrained`` (plus its processor) and
loaded back through our loader, the way a downloaded directory is. The fidelity tests load the
same random segment-anything weights through ``segment-anything`` and, converted, through
``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from backends.errors import ModelLoadError, ModelNotFound
from backends.models import hf
from backends.prompts import Box, Click, Prompt
from tests.conftest import TINY_SAM

IMAGE_SHAPE = (200, 300)
FAMILY_NAMES = ["sam-hf-vit-b", "sam-hq-vit-b", "sam2.1-hiera-tiny", "edgetam"]


def _has_timm() -> bool:
    import importlib.util

    return importlib.util.find_spec("timm") is not None


# --------------------------------------------------------------------------------------------
# Tiny models, saved the way a hub download looks


TINY_DECODER = {
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "iou_head_hidden_dim": 32,
}
TINY_HIERA = {
    "model_type": "sam2_hiera_det_model",
    "hidden_size": 8,
    "num_attention_heads": 1,
    "blocks_per_stage": [1, 1, 2, 1],
    "embed_dim_per_stage": [8, 16, 32, 64],
    "num_attention_heads_per_stage": [1, 1, 1, 1],
    "global_attention_blocks": [3],
}


def _tiny_sam2_vision() -> dict:
    return {
        "backbone_config": dict(TINY_HIERA),
        "backbone_channel_list": [64, 32, 16, 8],
        "fpn_hidden_size": 32,
    }


def _save(model, processor, directory: Path) -> Path:
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def _make_sam_hf(directory: Path) -> Path:
    """Tiny segment-anything weights converted with our converter (also tests it)."""
    from backends.models.sam.loader import build_sam_model

    torch.manual_seed(1)
    source = directory.parent / f"{directory.name}.pth"
    torch.save(build_sam_model(TINY_SAM).state_dict(), source)
    return hf.convert_sam_checkpoint(source, directory, architecture=TINY_SAM)


def _make_sam_hq(directory: Path) -> Path:
    from transformers import SamHQConfig, SamHQModel, SamHQProcessor, SamImageProcessor

    torch.manual_seed(2)
    config = SamHQConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "global_attn_indexes": [0],  # HQ-SAM reads the global blocks' features
            "output_channels": 32,
            "num_pos_feats": 16,
        },
        prompt_encoder_config={"hidden_size": 32},
        mask_decoder_config={**TINY_DECODER, "vit_dim": 32},
    )
    model = SamHQModel(config)
    with torch.no_grad():  # SAM's init is near zero (std 1e-10): give the masks some texture
        for parameter in model.vision_encoder.parameters():
            parameter.normal_(0.0, 0.05)
    return _save(model, SamHQProcessor(image_processor=SamImageProcessor()), directory)


def _make_sam2(directory: Path, *, video: bool = False) -> Path:
    from transformers import (
        Sam2Config,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        Sam2VideoConfig,
        Sam2VideoModel,
    )

    torch.manual_seed(3)
    kwargs = {
        "vision_config": _tiny_sam2_vision(),
        "prompt_encoder_config": {"hidden_size": 32},
        "mask_decoder_config": dict(TINY_DECODER),
    }
    if video:  # what the official facebook/sam2.1-* repositories hold
        config = Sam2VideoConfig(
            **kwargs,
            memory_attention_hidden_size=32,
            memory_encoder_hidden_size=32,
            memory_encoder_output_channels=16,
            mask_downsampler_embed_dim=32,
            memory_fuser_embed_dim=32,
        )
        model = Sam2VideoModel(config)
    else:
        model = Sam2Model(Sam2Config(**kwargs))
    return _save(model, Sam2Processor(image_processor=Sam2ImageProcessor()), directory)


def _make_edgetam(directory: Path) -> Path:
    from transformers import EdgeTamModel, Sam2ImageProcessor, Sam2Processor

    from backends.models.hf.families import default_config

    torch.manual_seed(4)
    config = default_config(  # the real RepViT-M1 backbone (timm), tiny neck and heads
        hf.model_info("edgetam"),
        vision_config={"fpn_hidden_size": 32},
        prompt_encoder_config={"hidden_size": 32},
        mask_decoder_config=dict(TINY_DECODER),
    )
    return _save(
        EdgeTamModel(config), Sam2Processor(image_processor=Sam2ImageProcessor()), directory
    )


_MAKERS = {
    "sam-hf-vit-b": _make_sam_hf,
    "sam-hq-vit-b": _make_sam_hq,
    "sam2.1-hiera-tiny": _make_sam2,
    "edgetam": _make_edgetam,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Directory per family, made on first use."""
    root = tmp_path_factory.mktemp("hf-models")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            assert name != "edgetam" or _has_timm(), "EdgeTAM needs timm (the hf extra has it)"
            made[name] = _MAKERS[name](root / name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def segmenters(model_dirs):
    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = hf.build(
                name, checkpoint=model_dirs(name), device="cpu", check_variant=False
            )
        return built[name]

    return get


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(*IMAGE_SHAPE, 3), dtype=np.uint8)
    img[50:150, 80:220] = rng.integers(180, 255, size=(100, 140, 3), dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def embeddings(segmenters, image):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = segmenters(name).encode(image)
        return cache[name]

    return get


def _spy(monkeypatch, module) -> tuple[list[dict], list]:
    """Record the keyword arguments and outputs of every ``module.forward`` call."""
    calls: list[dict] = []
    outputs: list = []
    original = module.forward

    def forward(*args, **kwargs):
        calls.append(kwargs)
        result = original(*args, **kwargs)
        outputs.append(result)
        return result

    monkeypatch.setattr(module, "forward", forward)
    return calls, outputs


# --------------------------------------------------------------------------------------------
# Each family through the real loader


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_click_and_box_give_image_size_masks(name, segmenters, embeddings, image, monkeypatch):
    segmenter = segmenters(name)
    embedding = embeddings(name)
    calls, _ = _spy(monkeypatch, segmenter.model)

    seg, state = segmenter.decode(image, embedding, Prompt((Click(150, 100),)), None)
    assert seg.mask.shape == IMAGE_SHAPE and seg.mask.dtype == bool
    assert isinstance(seg.score, float) and np.isfinite(seg.score)
    assert seg.model == name
    assert state.shape == (1, 1, 256, 256) and state.dtype == np.float32
    assert calls[-1]["multimask_output"] is True

    seg, state = segmenter.decode(image, embedding, Prompt(box=Box(80, 50, 220, 150)), None)
    assert seg.mask.shape == IMAGE_SHAPE
    assert calls[-1]["multimask_output"] is False
    assert state.shape == (1, 1, 256, 256)

    both = Prompt((Click(150, 100), Click(90, 60, positive=False)), Box(80, 50, 220, 150))
    seg, _ = segmenter.decode(image, embedding, both, None)
    assert seg.mask.shape == IMAGE_SHAPE


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_second_click_reuses_the_embedding_and_feeds_back_logits(
    name, segmenters, image, monkeypatch
):
    segmenter = segmenters(name)
    encoder_calls, _ = _spy(monkeypatch, segmenter.model.vision_encoder)
    calls, outputs = _spy(monkeypatch, segmenter.model)
    before = segmenter.encode_calls

    embedding = segmenter.encode(image)
    first = Prompt((Click(150, 100),))
    seg1, state1 = segmenter.decode(image, embedding, first, None)
    second = Prompt((*first.clicks, Click(90, 60, positive=False)))
    _seg2, state2 = segmenter.decode(image, embedding, second, state1)
    segmenter.decode(image, embedding, Prompt(box=Box(10, 10, 100, 100)), None)

    assert len(encoder_calls) == 1  # encode only: decoding never runs the image encoder
    assert segmenter.encode_calls == before + 1

    # First click: three candidates, the best predicted IoU is kept (mask, score and state).
    assert calls[0]["multimask_output"] is True and calls[0]["input_masks"] is None
    iou = outputs[0].iou_scores.reshape(-1)
    assert iou.numel() == 3
    best = int(iou.argmax())
    assert seg1.score == pytest.approx(float(iou[best]))
    expected_state = outputs[0].pred_masks[0, 0, best].numpy()
    if segmenter.family in ("sam2", "edgetam"):
        expected_state = np.clip(expected_state, -32.0, 32.0)
    np.testing.assert_array_equal(state1[0, 0], expected_state)

    # Second click: the previous best low-res logits go back in, one mask out.
    assert calls[1]["multimask_output"] is False
    np.testing.assert_array_equal(calls[1]["input_masks"].numpy(), state1)
    assert state2.shape == (1, 1, 256, 256)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_caller_mask_is_the_mask_input_where_it_lies(
    name, segmenters, embeddings, image, monkeypatch
):
    """A caller's mask (a pre-annotation to refine) goes in as low-res logits in the model's own
    frame: upscaled back the way the model upscales an answer, it is the caller's mask again."""
    segmenter = segmenters(name)
    embedding = embeddings(name)
    mask = np.zeros(IMAGE_SHAPE, bool)
    mask[40:120, 150:260] = True
    logits = segmenter.mask_logits(mask, embedding)
    assert tuple(logits.shape) == (1, 1, 256, 256)
    back = segmenter.backbone.upscale(logits, embedding)
    assert (back & mask).sum() / (back | mask).sum() > 0.95

    calls, _ = _spy(monkeypatch, segmenter.model)
    segmenter.decode(image, embedding, Prompt((Click(150, 100),), previous_mask=mask), None)
    assert calls[-1]["multimask_output"] is False
    np.testing.assert_array_equal(calls[-1]["input_masks"].numpy(), logits.numpy())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_embedding_bytes_and_shared_round_trip(name, segmenters, embeddings):
    segmenter = segmenters(name)
    embedding = embeddings(name)
    shapes = [tuple(t.shape) for t in embedding.tensors]
    assert shapes == segmenter.backbone.expected_shapes()
    assert embedding.nbytes == sum(t.numel() * 4 for t in embedding.tensors)
    if segmenter.family in ("sam2", "edgetam"):
        assert len(shapes) == 3  # image embedding + two high-resolution feature maps
        assert shapes[0][-2:] == (256, 256) and shapes[1][-2:] == (128, 128)
    if segmenter.family == "sam_hq":
        assert len(shapes) == 2  # + the ViT features of the first global-attention block

    data = segmenter.embedding_to_bytes(embedding)
    assert len(data) < embedding.nbytes // 2 + 1024  # fp16
    restored = segmenter.embedding_from_bytes(data)
    assert restored.original_size == embedding.original_size
    assert restored.input_size == embedding.input_size
    for a, b in zip(embedding.tensors, restored.tensors, strict=True):
        assert b.dtype == torch.float32
        # fp16: 1e-3 relative, and its subnormal spacing (6e-8) for near-zero random features
        assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max()) + 1e-7

    with pytest.raises(ValueError, match="truncated"):
        segmenter.embedding_from_bytes(data[:-2])
    other = "sam2.1-hiera-tiny" if segmenter.family != "sam2" else "sam-hf-vit-b"
    with pytest.raises(ValueError, match="not a shared"):
        segmenters(other).embedding_from_bytes(data)


def test_engine_caches_the_embedding_and_shares_it(segmenters, image):
    """Through the Engine: one encode for an interaction, its real bytes accounted, and a second
    worker taking the embedding from the shared tier instead of encoding."""
    from backends import images
    from backends.engine import Engine

    class Shared:
        def __init__(self) -> None:
            self.data: dict = {}

        def get(self, model, key):
            return self.data.get((model, key))

        def put(self, model, key, data):
            self.data[(model, key)] = data

    name = "sam2.1-hiera-tiny"
    segmenter = segmenters(name)
    shared = Shared()
    png = images.encode_png(image)
    engine = Engine({name: segmenter}, shared_embeddings=shared)
    clicks = (Click(150, 100), Click(90, 60, positive=False), Click(200, 120))
    for n in range(1, len(clicks) + 1):
        result = engine.segment(name, png, Prompt(clicks[:n]))
        assert result.mask.shape == IMAGE_SHAPE and result.model == name
    assert engine.stats.encodes == 1 and engine.stats.decodes == 3
    expected = sum(int(np.prod(shape)) * 4 for shape in segmenter.backbone.expected_shapes())
    assert engine.embeddings.stats.bytes == expected
    assert len(shared.data) == 1

    other = Engine({name: segmenter}, shared_embeddings=shared)
    before = segmenter.encode_calls
    assert other.segment(name, png, Prompt(clicks[:2])).mask.shape == IMAGE_SHAPE
    assert segmenter.encode_calls == before and other.stats.shared_hits == 1


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_wrong_model_type_and_size_are_refused(name, model_dirs):
    directory = model_dirs(name)
    other = "sam2.1-hiera-tiny" if name != "sam2.1-hiera-tiny" else "sam-hq-vit-b"
    info = hf.model_info(other)
    declared = json.loads((directory / "config.json").read_text())["model_type"]
    with pytest.raises(ModelLoadError) as excinfo:
        hf.build(other, checkpoint=directory, device="cpu", check_variant=False)
    message = str(excinfo.value)
    assert str(directory / "config.json") in message
    assert f"model_type {declared!r}" in message
    assert info.family.model_class in message and repr(info.family.model_types[0]) in message

    # The right family, but a tiny model under an official name: refused unless asked not to.
    with pytest.raises(ModelLoadError, match=r"another size than .*expected"):
        hf.build(name, checkpoint=directory, device="cpu")


def test_official_sam2_video_checkpoints_are_accepted(tmp_path, image):
    """facebook/sam2.1-* hold the video model (model_type sam2_video): Sam2Model loads it."""
    directory = _make_sam2(tmp_path / "video", video=True)
    segmenter = hf.build("sam2.1-hiera-tiny", checkpoint=directory, check_variant=False)
    assert segmenter.family == "sam2"
    assert json.loads((directory / "config.json").read_text())["model_type"] == "sam2_video"


# --------------------------------------------------------------------------------------------
# Loader errors (no model is built)


def test_missing_directory_names_the_path_and_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM2_MODEL_DIR", raising=False)
    monkeypatch.setenv("TAPMASK_MODELS_DIR", str(tmp_path / "models"))
    expected = tmp_path / "models" / "sam2.1-hiera-large"
    with pytest.raises(ModelLoadError) as excinfo:
        hf.build("sam2.1-hiera-large")
    message = str(excinfo.value)
    assert str(expected) in message and "tapmask weights sam2.1-hiera-large" in message
    assert "Sam2Model" in message and "config.json" in message

    monkeypatch.setenv("SAM2_MODEL_DIR", str(tmp_path / "env-dir"))
    assert hf.model_directory("sam2.1-hiera-large") == tmp_path / "env-dir"
    assert hf.model_directory("edgetam") == tmp_path / "models" / "edgetam"
    assert hf.model_directory("edgetam", tmp_path / "x") == tmp_path / "x"
    with pytest.raises(ModelLoadError, match=r"env-dir"):
        hf.build("sam2.1-hiera-large")


def test_incomplete_directories_name_the_missing_file(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json not found.*SamHQModel"):
        hf.build("sam-hq-vit-h", checkpoint=directory)

    (directory / "config.json").write_text('{"model_type": "sam_hq"}')
    (directory / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors not found.*pytorch_model\.bin"):
        hf.build("sam-hq-vit-h", checkpoint=directory)

    (directory / "model.safetensors").write_bytes(b"")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not readable JSON"):
        hf.build("sam-hq-vit-h", checkpoint=directory)

    (directory / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"model_type None.*'sam_hq'"):
        hf.build("sam-hq-vit-h", checkpoint=directory)


def test_a_segment_anything_file_points_to_the_converter(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"is a file.*--convert"):
        hf.build("sam-hf-vit-b", checkpoint=path)


def test_broken_weights_are_refused(model_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path / "broken"
    shutil.copytree(model_dirs("sam2.1-hiera-tiny"), directory)
    weights = load_file(str(directory / "model.safetensors"))
    weights.pop("mask_decoder.iou_token.weight")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weights: mask_decoder\.iou_token\.weight"):
        hf.build("sam2.1-hiera-tiny", checkpoint=directory, check_variant=False)

    (directory / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=r"cannot load Sam2Model"):
        hf.build("sam2.1-hiera-tiny", checkpoint=directory, check_variant=False)


def test_fused_edgetam_backbone_gives_the_same_embedding(model_dirs, segmenters, embeddings, image):
    fused = segmenters("edgetam")
    assert fused.backbone.channels_last  # the default: BatchNorm / RepVGG folded, NHWC convs
    plain = hf.build(
        "edgetam", checkpoint=model_dirs("edgetam"), check_variant=False, fuse_backbone=False
    )
    assert not plain.backbone.channels_last
    for a, b in zip(embeddings("edgetam").tensors, plain.encode(image).tensors, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-7


def test_edgetam_without_timm_says_so(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    # timm is installed here (the hf extra brings it): make it look missing for this test.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real_find_spec(n, *a)
    )
    directory = tmp_path / "edgetam"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "edgetam"}')
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"timm"):
        hf.build("edgetam", checkpoint=directory, check_variant=False)


def test_unknown_name_and_random_weights_with_checkpoint(tmp_path):
    with pytest.raises(ModelNotFound, match=r"sam2\.1-hiera-tiny"):
        hf.build("sam2.1-hiera-huge")
    with pytest.raises(ModelLoadError, match="mutually exclusive"):
        hf.build("sam2.1-hiera-tiny", checkpoint=tmp_path, random_weights=True)
    with pytest.raises(ModelLoadError, match="takes no option hq_token_only"):
        hf.build("sam2.1-hiera-tiny", random_weights=True, hq_token_only=True)
    with pytest.raises(ModelLoadError, match="takes no option fuse_backbone"):
        hf.build("sam-hq-vit-b", random_weights=True, fuse_backbone=False)


@pytest.mark.parametrize("name", hf.names())
def test_official_architectures_pass_their_size_check(name, tmp_path):
    """The default (official) config of each name, saved and read back, passes its own size check
    and fails every other size of its family."""
    from backends.models.hf import loading
    from backends.models.hf.families import default_config

    info = hf.model_info(name)
    default_config(info).save_pretrained(str(tmp_path))
    model_class = getattr(transformers, info.family.model_class)
    config = loading.load_config(model_class, info, tmp_path)
    loading.check_variant(info, config, tmp_path)
    for other in hf.MODELS.values():
        if other.family is info.family and other.name != name and other.fingerprint:
            with pytest.raises(ModelLoadError, match="another size"):
                loading.check_variant(other, config, tmp_path)


# --------------------------------------------------------------------------------------------
# Downloads (a fake hub: tests never touch the network)


def test_official_repositories():
    assert hf.names() == sorted(
        [
            "edgetam",
            "sam-hf-vit-b",
            "sam-hf-vit-h",
            "sam-hf-vit-l",
            "sam-hq-vit-b",
            "sam-hq-vit-h",
            "sam-hq-vit-l",
            "sam2.1-hiera-base-plus",
            "sam2.1-hiera-large",
            "sam2.1-hiera-small",
            "sam2.1-hiera-tiny",
        ]
    )
    repos = {name: hf.model_info(name).repo_id for name in hf.names()}
    assert repos["sam2.1-hiera-tiny"] == "facebook/sam2.1-hiera-tiny"
    assert repos["sam2.1-hiera-base-plus"] == "facebook/sam2.1-hiera-base-plus"
    assert repos["sam-hq-vit-b"] == "syscv-community/sam-hq-vit-base"
    assert repos["sam-hq-vit-h"] == "syscv-community/sam-hq-vit-huge"
    assert repos["sam-hf-vit-l"] == "facebook/sam-vit-large"
    assert repos["edgetam"] == "yonigozlan/EdgeTAM-hf"


def test_download_uses_the_official_repo_and_only_safe_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPMASK_MODELS_DIR", str(tmp_path / "models"))
    seen: dict = {}

    def fake_snapshot(**kwargs):
        seen.update(kwargs)
        target = Path(kwargs["local_dir"])
        (target / "config.json").write_text('{"model_type": "sam_hq"}')
        (target / "model.safetensors").write_bytes(b"weights")
        return str(target)

    path = hf.download("sam-hq-vit-l", snapshot_download=fake_snapshot)
    assert path == tmp_path / "models" / "sam-hq-vit-l"
    assert seen["repo_id"] == "syscv-community/sam-hq-vit-large"
    assert Path(seen["local_dir"]) == path
    assert "model.safetensors" in seen["allow_patterns"]
    assert not any(p.endswith((".bin", ".pth", ".pt")) for p in seen["allow_patterns"])
    assert path / "model.safetensors" in path.iterdir()


def test_download_failures_are_model_load_errors(tmp_path):
    def offline(**kwargs):
        raise OSError("no network")

    with pytest.raises(ModelLoadError, match=r"facebook/sam2\.1-hiera-small.*no network"):
        hf.download("sam2.1-hiera-small", tmp_path / "a", snapshot_download=offline)

    def config_only(**kwargs):
        (Path(kwargs["local_dir"]) / "config.json").write_text("{}")

    with pytest.raises(ModelLoadError, match=r"no safetensors"):
        hf.download("edgetam", tmp_path / "b", snapshot_download=config_only)


# --------------------------------------------------------------------------------------------
# Fidelity: the same random SAM weights through segment-anything and, converted, transformers

#: ViT-B structure (width 768, 12 heads, window 14, 1024 input, official prompt encoder and mask
#: decoder) with 2 encoder blocks instead of 12 (one windowed, one global) to keep the CPU test
#: short. The per-block code is the same for every depth.
VIT_B_REDUCED = {
    "encoder_embed_dim": 768,
    "encoder_depth": 2,
    "encoder_num_heads": 12,
    "encoder_global_attn_indexes": (1,),
}


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    from backends.models.sam import loader

    root = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    source = root / "sam_vit_b_reduced.pth"
    torch.save(loader.build_sam_model(VIT_B_REDUCED).state_dict(), source)
    directory = hf.convert_sam_checkpoint(source, root / "hf", architecture=VIT_B_REDUCED)
    ours = loader.build("sam", checkpoint=source, device="cpu", architecture=VIT_B_REDUCED)
    theirs = hf.build("sam-hf-vit-b", checkpoint=directory, device="cpu", check_variant=False)
    return ours, theirs


def _photo(height: int = 480, width: int = 640) -> np.ndarray:
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 60 * np.sin(xs / 70), 110 + 50 * np.cos(ys / 50), 0.1 * (xs + ys)], 2)
    img[120:360, 200:470] = [220, 60, 40]
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_converted_image_embeddings_match(fidelity):
    ours, theirs = fidelity
    from segment_anything.utils.transforms import ResizeLongestSide

    image = _photo()
    resized = ResizeLongestSide(1024).apply_image(image)
    tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    with torch.inference_mode():
        pixels = ours.model.preprocess(tensor.float())  # normalised + padded to 1024×1024
        expected = ours.model.image_encoder(pixels)
        actual = theirs.model.get_image_embeddings(pixels)
    assert tuple(actual.shape) == tuple(expected.shape) == (1, 256, 64, 64)
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= 1e-4 * scale


def test_converted_masks_match(fidelity):
    ours, theirs = fidelity
    image = _photo()
    emb_ours, emb_theirs = ours.encode(image), theirs.encode(image)
    clicks = (Click(330, 240), Click(100, 80, positive=False), Click(450, 150))
    state_ours = state_theirs = None
    for n in range(1, len(clicks) + 1):
        prompt = Prompt(clicks[:n])
        a, state_ours = ours.decode(image, emb_ours, prompt, state_ours)
        b, state_theirs = theirs.decode(image, emb_theirs, prompt, state_theirs)
        assert 0 < a.mask.sum() < a.mask.size  # not a trivial comparison
        assert _iou(a.mask, b.mask) >= 0.99, f"click {n}"
    box = Prompt(box=Box(200, 120, 470, 360))
    a, _ = ours.decode(image, emb_ours, box, None)
    b, _ = theirs.decode(image, emb_theirs, box, None)
    assert _iou(a.mask, b.mask) >= 0.99


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_key_mapping_covers_the_official_architectures(variant):
    """Every official segment-anything key maps onto a SamModel key of the same shape."""
    from segment_anything import sam_model_registry
    from transformers import SamConfig, SamModel

    from backends.models.hf.convert import convert_state_dict
    from backends.models.sizes import SAM_VIT_SIZES

    with torch.device("meta"):  # shapes only: no memory, no init time
        official = sam_model_registry[variant](checkpoint=None).state_dict()
        target = SamModel(SamConfig(**SAM_VIT_SIZES[variant].hf_config())).state_dict()
    converted = convert_state_dict(official)
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)


def test_convert_refuses_foreign_files(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(32, 3, 16, 16)}, path)
    with pytest.raises(ModelLoadError, match="width 32"):
        hf.convert_sam_checkpoint(path, tmp_path / "out")
    with pytest.raises(ModelLoadError, match=r"missing keys"):
        hf.convert_sam_checkpoint(path, tmp_path / "out", architecture=TINY_SAM)
    with pytest.raises(ModelLoadError, match="does not exist"):
        hf.convert_sam_checkpoint(tmp_path / "absent.pth", tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Capabilities and the size table


def test_capabilities_follow_the_embedding_layout(segmenters, embeddings):
    """Every family shares its embeddings; SAM and HQ-SAM also export SAM's image embedding
    (CVAT's stock SAM plugin), SAM 2.1 and EdgeTAM have no such embedding to export."""
    from backends.models.base import ExportsEmbedding, SharesEmbeddings, accepts_box

    for name in FAMILY_NAMES:
        segmenter = segmenters(name)
        assert isinstance(segmenter, SharesEmbeddings) and accepts_box(segmenter)
        exports = segmenter.family in ("sam", "sam_hq")
        assert isinstance(segmenter, ExportsEmbedding) is exports
        if exports:
            embedding = embeddings(name)
            exported = segmenter.export_embedding(embedding)
            np.testing.assert_array_equal(exported, embedding.to_numpy()[0])
            assert exported.shape == (1, 32, 64, 64)  # the tiny models' 32 channels


def test_default_configs_are_the_official_ones():
    """The size table gives transformers' own defaults where those are the official model."""
    from transformers import EdgeTamConfig, Sam2Config, SamConfig

    from backends.models.hf.families import default_config

    def same(a, b) -> bool:
        return {**a.to_dict(), "transformers_version": None} == {
            **b.to_dict(),
            "transformers_version": None,
        }

    assert same(default_config(hf.model_info("sam2.1-hiera-tiny")), Sam2Config())
    assert same(default_config(hf.model_info("sam-hf-vit-b")), SamConfig())
    edgetam = default_config(hf.model_info("edgetam"))
    assert edgetam.vision_config.backbone_config.architecture == "repvit_m1"
    assert list(edgetam.vision_config.backbone_channel_list) == list(
        EdgeTamConfig().vision_config.backbone_channel_list
    )


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_batched_encode_equals_encoding_one_by_one(name, segmenters, image):
    """A worker encodes the first clicks waiting in its queues in one pass: each image's
    embedding (different sizes, so different input frames) is the one-by-one embedding, and a
    click decodes to the same mask."""
    segmenter = segmenters(name)
    other = np.ascontiguousarray(np.rot90(image))[:150]  # another size and content
    batched = segmenter.encode_batch([image, other, image])
    for picture, embedding in zip([image, other, image], batched, strict=True):
        alone = segmenter.encode(picture)
        assert embedding.original_size == alone.original_size
        assert embedding.input_size == alone.input_size
        for got, want in zip(embedding.tensors, alone.tensors, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        prompt = Prompt((Click(60.0, 40.0),))
        mask, _ = segmenter.decode(picture, embedding, prompt, None)
        expected, _ = segmenter.decode(picture, alone, prompt, None)
        assert (mask.mask == expected.mask).mean() > 0.999
