"""SAM 2.1 and EdgeTAM video trackers on tiny random models through the real loading code: a
synthetic clip tracked frame by frame with the state carried between requests, memory bounded
after a few frames, and the same answers whichever engine (sharing the Redis tier) served the
frame before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends.engine import Engine
from backends.errors import ModelLoadError
from backends.models import hf, registry
from backends.models.hf import video
from backends.prompts import Box, Click, TrackTarget
from backends.redis.embeddings import RedisEmbeddingStore
from backends.redis.protocol import Keys
from backends.video.synthetic import build_clip
from tests.support.processes import RedisServer

SIZE = 256  # a 256-px model input: 16×16 memory tokens, fast on a loaded CPU
#: Small memory window so that "bounded" shows within a few frames.
MEMORY = {"num_maskmem": 3, "max_object_pointers_in_encoder": 4}
TINY_HIERA = {
    "model_type": "sam2_hiera_det_model",
    "hidden_size": 8,
    "num_attention_heads": 1,
    "blocks_per_stage": [1, 1, 2, 1],
    "embed_dim_per_stage": [8, 16, 32, 64],
    "num_attention_heads_per_stage": [1, 1, 1, 1],
    "global_attention_blocks": [3],
    "image_size": [SIZE, SIZE],
}
#: transformers hard-codes the memory width to 64 and splits object pointers only when the
#: model is wider than that: 128 is the smallest width that runs the official code paths.
WIDTH = 128
HEADS = {
    "prompt_encoder_config": {"hidden_size": WIDTH, "image_size": SIZE},
    "mask_decoder_config": {
        "hidden_size": WIDTH,
        "mlp_dim": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": 32,
    },
    "image_size": SIZE,
    "memory_attention_rope_feat_sizes": [SIZE // 16, SIZE // 16],
    "memory_attention_hidden_size": WIDTH,
    "memory_attention_num_layers": 1,
    "memory_attention_feed_forward_hidden_size": 64,
    "memory_encoder_hidden_size": WIDTH,
    "mask_downsampler_embed_dim": WIDTH,
    "memory_fuser_embed_dim": WIDTH,
    "memory_fuser_intermediate_dim": 64,
    "memory_fuser_num_layers": 1,
    **MEMORY,
}
FEATURES = [[SIZE // 4, SIZE // 4], [SIZE // 8, SIZE // 8], [SIZE // 16, SIZE // 16]]


def _save(model, directory: Path) -> Path:
    from transformers import Sam2ImageProcessor, Sam2Processor

    model.save_pretrained(str(directory))
    processor = Sam2ImageProcessor(size={"height": SIZE, "width": SIZE})
    Sam2Processor(image_processor=processor).save_pretrained(str(directory))
    return directory


def _make_sam2(directory: Path) -> Path:
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(5)
    vision = {
        "backbone_config": dict(TINY_HIERA),
        "backbone_channel_list": [64, 32, 16, 8],
        "fpn_hidden_size": WIDTH,
        "backbone_feature_sizes": FEATURES,
    }
    return _save(Sam2VideoModel(Sam2VideoConfig(vision_config=vision, **HEADS)), directory)


def _make_edgetam(directory: Path) -> Path:
    from transformers import EdgeTamVideoModel

    torch.manual_seed(6)
    config = video.default_video_config(
        hf.model_info("edgetam-video"),
        vision_config={"fpn_hidden_size": WIDTH, "backbone_feature_sizes": FEATURES},
        perceiver_resampler_num_layers=1,
        **HEADS,
    )
    return _save(EdgeTamVideoModel(config), directory)


MAKERS = {"sam2.1-hiera-tiny-video": _make_sam2, "edgetam-video": _make_edgetam}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-models")
    return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def clip(grabcut_dir):
    return build_clip(grabcut_dir, objects=1, frames=8, width=160, height=96, seed=2)


def _tracker(name: str, model_dirs) -> video.VideoTracker:
    return registry.create(name, checkpoint=model_dirs[name], check_variant=False, device="cpu")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_clip_is_tracked_with_the_memory_bounded(name, model_dirs, clip):
    tracker = _tracker(name, model_dirs)
    assert isinstance(tracker, video.VideoTracker)
    assert (tracker.memory_frames, tracker.pointer_frames) == (2, 3)
    frame, truth = clip.frame(0)
    tracked, state = tracker.start(frame, TrackTarget(mask=truth[0]))
    assert tracked.mask.shape == truth[0].shape
    sizes = []
    for index in range(1, len(clip)):
        frame, _ = clip.frame(index)
        tracked, state = tracker.step(frame, state)
        assert tracked.mask.shape == truth[0].shape and 0.0 <= tracked.score <= 1.0
        sizes.append(state.nbytes)
        with_features = [i for i, out in state.recent if "maskmem_features" in out]
        assert with_features == list(range(max(1, index - 1), index + 1))[-2:]
        assert len(state.recent) == min(index, 3)
    assert state.frame == len(clip) - 1
    assert sizes[-1] == sizes[-2] == sizes[-3]  # flat once the window is full
    restored = tracker.state_from_bytes(tracker.state_to_bytes(state))
    frame, _ = clip.frame(0)
    a, _ = tracker.step(frame, state)
    b, _ = tracker.step(frame, restored)
    np.testing.assert_array_equal(a.mask, b.mask)  # states are canonical fp16
    assert a.score == b.score


def test_box_polygon_and_click_starts(model_dirs, clip):
    tracker = _tracker("sam2.1-hiera-tiny-video", model_dirs)
    frame, _ = clip.frame(0)
    for target in (
        TrackTarget(box=Box(10, 10, 80, 60)),
        TrackTarget(polygon=((10.0, 10.0), (80.0, 12.0), (50.0, 60.0))),
        TrackTarget(clicks=(Click(40, 30), Click(70, 50, positive=False))),
        TrackTarget(box=Box(10, 10, 80, 60), clicks=(Click(40, 30),)),
    ):
        _, state = tracker.start(frame, target)
        assert state.frame == 0 and state.recent == ()
        tracker.step(clip.frame(1)[0], state)


def test_foreign_state_bytes_are_refused(model_dirs, clip):
    sam2 = _tracker("sam2.1-hiera-tiny-video", model_dirs)
    frame, truth = clip.frame(0)
    _, state = sam2.start(frame, TrackTarget(mask=truth[0]))
    data = sam2.state_to_bytes(state)
    with pytest.raises(ValueError):
        sam2.state_from_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        sam2.state_from_bytes(_flow_state_bytes(frame, truth[0]))


def _flow_state_bytes(frame, mask) -> bytes:
    flow = registry.create("flow")
    return flow.state_to_bytes(flow.start(frame, TrackTarget(mask=mask))[1])


def test_the_loader_checks_apply(model_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="another size"):
        registry.create("sam2.1-hiera-tiny-video", checkpoint=model_dirs["sam2.1-hiera-tiny-video"])
    with pytest.raises(ModelLoadError, match="model_type"):
        registry.create("sam2.1-hiera-tiny-video", checkpoint=model_dirs["edgetam-video"])
    (tmp_path / "config.json").write_text('{"model_type": "sam2_video"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled weights are never loaded"):
        registry.create("sam2.1-hiera-tiny-video", checkpoint=tmp_path)
    assert hf.model_directory("edgetam-video").name == "edgetam"  # the image model's files


def test_answers_do_not_depend_on_which_engine_served_the_frame(model_dirs, clip):
    name = "sam2.1-hiera-tiny-video"
    with RedisServer() as server:

        def engine(shared: bool) -> Engine:
            store = RedisEmbeddingStore(server.client(), Keys(), tier="trk") if shared else None
            built = Engine(shared_track_states=store)
            built.add_model(name, _tracker(name, model_dirs))
            return built

        alone, first, second = engine(False), engine(True), engine(True)
        _, truth = clip.frame(0)
        one = two = [TrackTarget(mask=truth[0])]
        for index in range(5):
            data = clip.encoded(index)
            a = alone.track(name, data, one)[0]
            b = (first if index % 2 == 0 else second).track(name, data, two)[0]
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.score == pytest.approx(b.score, abs=0)
            one = [TrackTarget(mask=truth[0], state=a.state)]
            two = [TrackTarget(mask=truth[0], state=b.state)]
        assert first.tracking.stats.shared_hits + second.tracking.stats.shared_hits == 4
