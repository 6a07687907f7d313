from __future__ import annotations

from pathlib import Path

import pytest

from backends.models import sizes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GRABCUT = SHARED / "datasets" / "GrabCut"


@pytest.fixture(scope="session")
def grabcut_dir() -> Path:
    assert (GRABCUT / "data_GT").is_dir(), f"test data missing: {GRABCUT} (../shared next to repo)"
    return GRABCUT


TINY_SAM = sizes.TINY_SAM  # tests import it from here


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """Random (seeded) tiny SAM weights saved as a plain state dict, like the official files."""
    import torch

    from backends.models.sam.loader import build_sam_model

    torch.manual_seed(0)
    model = build_sam_model(TINY_SAM)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def edgetam_dir(tmp_path_factory) -> Path:
    """A real-size EdgeTAM (RepViT-M1 + SAM 2 heads) with random weights, saved the way the hub
    stores it (config.json + model.safetensors + processor), so the real loader and its size check
    accept it. 37 MB; one encode takes well under a second on a CPU."""
    import torch
    from transformers import EdgeTamModel, Sam2ImageProcessor, Sam2Processor

    from backends.models import hf
    from backends.models.hf.families import default_config

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "edgetam"
    EdgeTamModel(default_config(hf.model_info("edgetam"))).save_pretrained(str(directory))
    Sam2Processor(image_processor=Sam2ImageProcessor()).save_pretrained(str(directory))
    return directory
