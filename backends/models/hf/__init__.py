"""Model families served through Hugging Face ``transformers``: SAM 2.1, HQ-SAM, EdgeTAM, and SAM
checkpoints in Hugging Face format.

Every model loads from a *local directory* holding ``config.json`` + ``model.safetensors`` (plus,
optionally, the processor's ``preprocessor_config.json``), with ``local_files_only=True``: nothing
is downloaded at serve time and no pickle is ever read. The directory is, in order:

1. the ``checkpoint=`` argument (``--checkpoint`` on the command line);
2. the family's environment override (``SAM2_MODEL_DIR``, ``SAM_HQ_MODEL_DIR``,
   ``EDGETAM_MODEL_DIR``, ``SAM_HF_MODEL_DIR``);
3. ``$TAPMASK_MODELS_DIR/<name>`` (``models_dir()``), where ``tapmask weights <name>`` puts it.

This module is import-light (no torch, no transformers): the registry, the CLI's ``weights``
command and ``download`` use it on machines without the model stack. ``build`` imports the heavy
parts when a model is actually loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.errors import ModelLoadError, ModelNotFound
from backends.models.sizes import EDGETAM_FINGERPRINT, HIERA_SIZES, SAM_VIT_SIZES
from backends.weights import models_dir

if TYPE_CHECKING:
    from backends.models.sam.core import SamSegmenter


@dataclass(frozen=True)
class Family:
    """What one transformers model family needs: classes, accepted config types, env override."""

    key: str  # "sam", "sam_hq", "sam2", "edgetam"
    label: str  # for messages: "SAM 2.1"
    model_class: str  # transformers class name
    model_types: tuple[str, ...]  # accepted ``config.json`` model_type values
    env: str  # directory override for every model of the family


@dataclass(frozen=True)
class HfModel:
    """One registry name: its family, official hub repository and size fingerprint."""

    name: str
    family: Family
    repo_id: str
    description: str
    #: ``config.json`` values that identify this size: dotted path -> expected value. A directory
    #: of another size is refused (``check_variant=False`` turns the check off, for tests).
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    variant: str = ""  # key of ``backends.models.sizes``' tables: "vit_b", "tiny"…


SAM = Family("sam", "SAM (Hugging Face format)", "SamModel", ("sam",), "SAM_HF_MODEL_DIR")
SAM_HQ = Family("sam_hq", "HQ-SAM", "SamHQModel", ("sam_hq",), "SAM_HQ_MODEL_DIR")
SAM2 = Family("sam2", "SAM 2.1", "Sam2Model", ("sam2", "sam2_video"), "SAM2_MODEL_DIR")
EDGETAM = Family(
    "edgetam", "EdgeTAM", "EdgeTamModel", ("edgetam", "edgetam_video"), "EDGETAM_MODEL_DIR"
)
GROUNDING_DINO = Family(
    "grounding_dino",
    "Grounding DINO",
    "GroundingDinoForObjectDetection",
    ("grounding-dino",),
    "GROUNDING_DINO_MODEL_DIR",
)
FAMILIES = {family.key: family for family in (SAM, SAM_HQ, SAM2, EDGETAM, GROUNDING_DINO)}

#: The word for each SAM ViT size in the hub repositories' names.
_VIT_NAMES = {"vit_b": "base", "vit_l": "large", "vit_h": "huge"}


def _sam_models() -> dict[str, HfModel]:
    table: dict[str, HfModel] = {}
    for size, hiera in HIERA_SIZES.items():
        name = f"sam2.1-hiera-{size}"
        label = size.upper() if size != "base-plus" else "B+"
        description = f"SAM 2.1 Hiera-{label} (transformers)"
        repo = f"facebook/sam2.1-hiera-{size}"
        table[name] = HfModel(name, SAM2, repo, description, hiera.hf_fingerprint(), size)
    for variant, vit in SAM_VIT_SIZES.items():
        short, fingerprint = variant[-1], vit.hf_fingerprint()
        table[f"sam-hq-vit-{short}"] = HfModel(
            f"sam-hq-vit-{short}",
            SAM_HQ,
            f"syscv-community/sam-hq-vit-{_VIT_NAMES[variant]}",
            f"HQ-SAM ViT-{short.upper()} (transformers)",
            fingerprint,
            variant,
        )
        table[f"sam-hf-vit-{short}"] = HfModel(
            f"sam-hf-vit-{short}",
            SAM,
            f"facebook/sam-vit-{_VIT_NAMES[variant]}",
            f"Segment Anything ViT-{short.upper()}, Hugging Face format (transformers)",
            fingerprint,
            variant,
        )
    table["edgetam"] = HfModel(
        "edgetam",
        EDGETAM,
        "yonigozlan/EdgeTAM-hf",
        "EdgeTAM: RepViT-M1 SAM 2 for the edge (transformers; needs timm)",
        EDGETAM_FINGERPRINT,
        "edgetam",
    )
    return table


#: Every segmenter of this package by registry name.
MODELS: dict[str, HfModel] = _sam_models()

#: Swin backbone sizes of the official Grounding DINO checkpoints (``config.json`` values).
_SWIN_FINGERPRINTS = {
    "tiny": {"backbone_config.embed_dim": 96, "backbone_config.depths": [2, 2, 6, 2]},
    "base": {"backbone_config.embed_dim": 128, "backbone_config.depths": [2, 2, 18, 2]},
}

#: Every open-vocabulary detector of this package by registry name (text → boxes).
DETECTORS: dict[str, HfModel] = {
    f"grounding-dino-{size}": HfModel(
        f"grounding-dino-{size}",
        GROUNDING_DINO,
        f"IDEA-Research/grounding-dino-{size}",
        f"Grounding DINO Swin-{size[0].upper()} text-prompted detector (transformers)",
        fingerprint,
        size,
    )
    for size, fingerprint in _SWIN_FINGERPRINTS.items()
}

#: Files fetched from the hub: the model, its config and the processor's config; nothing else.
HUB_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    # a detector's text tokenizer (Grounding DINO: BERT's)
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def names() -> list[str]:
    """The segmenters' names (``DETECTORS`` holds the detectors')."""
    return sorted(MODELS)


def model_info(name: str) -> HfModel:
    try:
        return MODELS[name] if name in MODELS else DETECTORS[name]
    except KeyError:
        raise ModelNotFound(
            f"unknown transformers model {name!r}; known: {', '.join(names())}"
        ) from None


def model_directory(name: str, checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Where model ``name`` is read from: ``checkpoint``, else the family's env, else
    ``$TAPMASK_MODELS_DIR/<name>``."""
    info = model_info(name)
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    env = os.environ.get(info.family.env)
    if env:
        return Path(env).expanduser()
    return models_dir() / name


def build(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: Any = None,
    **options: Any,
) -> SamSegmenter:
    """Registry factory for every name in ``MODELS``.

    ``checkpoint``: the model directory (see the module docstring for the default).
    Options: ``autocast`` (bf16 for the image encoder on CUDA; default on where supported),
    ``check_variant`` (refuse a directory of another size; default True),
    ``random_weights=True`` (the official architecture, untrained, no file read: benchmarks),
    ``hq_token_only`` (HQ-SAM: the HQ mask alone instead of SAM + HQ; default False; the SAM
    names take it and ignore it), ``fuse_backbone`` (EdgeTAM: fuse the RepViT backbone for
    inference, run it channels-last; default True; the SAM 2.1 names take it and ignore it).

    Serving never reaches the hub: ``HF_HUB_OFFLINE`` is set for the process (unless the
    environment sets it) before transformers loads. Older transformers releases (5.17, seen on
    a GPU machine) built a default EdgeTAM config by fetching ``timm/repvit_m1.dist_in1k`` while
    constructing the model; offline, such a fetch fails at once instead of retrying for 30 s.
    """
    info = model_info(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from backends.models.hf.families import build as build_family_model
    except ImportError as exc:
        raise ModelLoadError(
            f"model {name!r} needs {exc.name or exc} (pip install 'tapmask[hf]')"
        ) from exc
    return build_family_model(info, checkpoint=checkpoint, device=device, **options)


def build_detector(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: Any = None,
    **options: Any,
) -> Any:
    """Registry factory for every name in ``DETECTORS`` (a ``Detector``; options: see
    ``backends.models.hf.grounding_dino.build``). Never reaches the hub (see ``build``)."""
    info = model_info(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from backends.models.hf.grounding_dino import build as build_grounding_dino
    except ImportError as exc:
        raise ModelLoadError(
            f"model {name!r} needs {exc.name or exc} (pip install 'tapmask[hf]')"
        ) from exc
    return build_grounding_dino(info, checkpoint=checkpoint, device=device, **options)


def download(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    snapshot_download: Callable[..., str] | None = None,
) -> Path:
    """Fetch model ``name`` from the Hugging Face hub into ``dest`` (default
    ``$TAPMASK_MODELS_DIR/<name>``) and return the directory. Needs internet; serving never
    calls it. Only ``HUB_FILES`` are fetched (safetensors, configs): no pickled weights.

    ``snapshot_download`` replaces ``huggingface_hub.snapshot_download`` (tests).
    """
    info = model_info(name)
    target = Path(dest).expanduser() if dest is not None else models_dir() / name
    if snapshot_download is None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise ModelLoadError(
                f"downloading {name!r} needs huggingface_hub (pip install 'tapmask[hf]')"
            ) from exc
    target.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            repo_id=info.repo_id,
            revision=revision,
            local_dir=str(target),
            allow_patterns=list(HUB_FILES),
        )
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise ModelLoadError(f"downloading {info.repo_id} for {name!r} failed: {exc}") from exc
    if not (target / "config.json").is_file():
        raise ModelLoadError(f"{info.repo_id} has no config.json; nothing usable in {target}")
    if not any(target.glob("model*.safetensors")):
        raise ModelLoadError(
            f"{info.repo_id} has no safetensors weights (only those are loaded); see {target}"
        )
    return target


def convert_sam_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], **options: Any
) -> Path:
    """A segment-anything ``.pth`` state dict → a ``sam-hf-*`` directory (see ``convert``)."""
    from backends.models.hf.convert import convert_sam_checkpoint as convert

    return convert(src, dst, **options)


__all__ = [
    "DETECTORS",
    "FAMILIES",
    "HUB_FILES",
    "MODELS",
    "Family",
    "HfModel",
    "build",
    "build_detector",
    "convert_sam_checkpoint",
    "download",
    "model_directory",
    "model_info",
    "names",
]
