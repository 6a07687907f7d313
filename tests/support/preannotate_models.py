"""A tiny random Grounding DINO for pre-annotation tests, saved and loaded the real way.

``tiny_detector_dir(path)`` saves one (tiny Swin + tiny BERT, seeded random weights, a BERT
tokenizer over a few words) like the hub stores the official model; ``build`` is a registry
factory loading it through ``backends.models.hf.grounding_dino.build`` (size check off), so a
worker started with ``--plugin tests.support.preannotate_models --models test-grounding-dino``
serves it: the directory comes from ``$TAPMASK_TEST_DETECTOR_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backends.models.registry import ModelSpec, register

WORDS = ("object", "car", "truck", "person", "flower", "animal", "thing")


def tiny_config() -> Any:
    import transformers

    swin = transformers.SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_indices=[2, 3, 4],
        out_features=["stage2", "stage3", "stage4"],
    )
    bert = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=300,
    )
    return transformers.GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # one decoder layer breaks transformers' box-head weight tying
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        encoder_n_points=2,
        decoder_n_points=2,
    )


def tiny_detector_dir(path: Path) -> Path:
    from backends.models.hf.grounding_dino import save_random_model

    size = {"shortest_edge": 224, "longest_edge": 320}
    return save_random_model(path, tiny_config(), WORDS, image_size=size)


def build(name: str, device: str | None = None, checkpoint: str | None = None) -> Any:
    from backends.models import hf
    from backends.models.hf.grounding_dino import build as build_grounding_dino

    directory = checkpoint or os.environ["TAPMASK_TEST_DETECTOR_DIR"]
    detector = build_grounding_dino(
        hf.model_info("grounding-dino-tiny"), directory, device, check_variant=False
    )
    detector.name = name
    return detector


register(
    ModelSpec(
        "test-grounding-dino",
        "tests.support.preannotate_models:build",
        "test: tiny random Grounding DINO",
        kind="detector",
    )
)
