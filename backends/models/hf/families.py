"""Building the transformers families' segmenters (SAM, HQ-SAM, SAM 2.1, EdgeTAM): the model from
a checked local directory or, for benchmarks, the official architecture with random weights
(``default_config``), its processor, and the backbone behind a ``SamSegmenter``.

EdgeTAM's image encoder is a ``timm`` RepViT-M1: it needs the ``timm`` package. For inference its
BatchNorms and RepVGG branches are fused and it runs channels-last (``optimize_edgetam``).
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError
from backends.models.hf import HfModel, model_directory
from backends.models.hf.backbones import Sam2HfBackbone, SamHfBackbone
from backends.models.hf.loading import load_checked, load_image_processor
from backends.models.sam.core import Backbone, ExportingSamSegmenter, SamSegmenter
from backends.models.sizes import EDGETAM_BACKBONE, HIERA_SIZES, SAM_VIT_SIZES


def default_config(info: HfModel, **overrides: Any) -> Any:
    """The official architecture of ``info`` as its transformers config: SAM / HQ-SAM from
    ``SAM_VIT_SIZES``, SAM 2.1 from ``HIERA_SIZES``, EdgeTAM as ``EdgeTamConfig`` with the
    RepViT-M1 backbone (``EDGETAM_BACKBONE``). ``overrides``: more config arguments; the keys of
    a ``vision_config`` mapping replace those of the official one (tests shrink the heads)."""
    import transformers

    key = info.family.key
    if key in ("sam", "sam_hq"):
        kwargs = SAM_VIT_SIZES[info.variant].hf_config()
        if key == "sam_hq":  # HQ-SAM's decoder reads the ViT's features
            kwargs["mask_decoder_config"]["vit_dim"] = kwargs["vision_config"]["hidden_size"]
    elif key == "sam2":
        kwargs = {"vision_config": HIERA_SIZES[info.variant].hf_vision_config()}
    else:
        backbone = transformers.TimmWrapperConfig(**EDGETAM_BACKBONE)
        kwargs = {"vision_config": {"backbone_config": backbone}}
    kwargs["vision_config"].update(overrides.pop("vision_config", {}))
    config_class = getattr(transformers, info.family.model_class).config_class
    return config_class(**kwargs, **overrides)


def _require_timm(info: HfModel) -> None:
    if info.family.key == "edgetam" and importlib.util.find_spec("timm") is None:
        raise ModelLoadError(
            f"model {info.name!r} needs the timm package for its RepViT image encoder "
            "(pip install timm)"
        )


def _load(
    model_class: Any,
    info: HfModel,
    checkpoint: str | os.PathLike[str] | None,
    *,
    random_weights: bool,
    check_variant: bool,
) -> tuple[Any, Path | None]:
    """The model (eval mode, CPU) and the directory it came from (None: random weights)."""
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        _require_timm(info)
        return model_class(default_config(info)).eval(), None
    directory = model_directory(info.name, checkpoint)
    requires = partial(_require_timm, info)  # checked once the directory is known to be right
    model = load_checked(model_class, info, directory, variant=check_variant, requires=requires)
    return model, directory


def optimize_edgetam(model: Any) -> bool:
    """Inference-only speed-ups for EdgeTAM's RepViT backbone; returns whether they applied.

    * timm's ``reparameterize_model`` folds every BatchNorm into its convolution and merges the
      RepVGG branches (the same outputs to float rounding: RepViT is built to be fused);
    * the backbone runs channels-last, the layout oneDNN / cuDNN convolutions prefer.

    Together about 2x faster image encodes on a CPU. The model must be in eval mode (the fusion
    uses BatchNorm's running statistics) and is never trained or saved afterwards.
    """
    backbone = getattr(model.vision_encoder, "backbone", None)
    timm_model = getattr(backbone, "timm_model", None)
    if timm_model is None:
        return False
    try:
        from timm.models import reparameterize_model
    except ImportError:  # older timm
        from timm.utils.model import reparameterize_model
    reparameterize_model(timm_model, inplace=True)
    backbone.to(memory_format=torch.channels_last)
    return True


#: The options only some families take: option -> family keys.
FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    "hq_token_only": ("sam", "sam_hq"),
    "fuse_backbone": ("sam2", "edgetam"),
}


def build(
    info: HfModel,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    autocast: bool | None = None,
    check_variant: bool = True,
    random_weights: bool = False,
    **options: bool,
) -> SamSegmenter:
    """The segmenter of ``info`` (options: see ``backends.models.hf.build``). SAM and HQ-SAM
    export their image embedding; SAM 2.1 and EdgeTAM have none in SAM's layout."""
    import transformers

    refused = sorted(key for key in options if info.family.key not in FAMILY_OPTIONS.get(key, ()))
    if refused:
        raise ModelLoadError(f"model {info.name!r} takes no option {', '.join(refused)}")
    model, directory = _load(
        getattr(transformers, info.family.model_class),
        info,
        checkpoint,
        random_weights=random_weights,
        check_variant=check_variant,
    )
    if info.family.key in ("sam", "sam_hq"):
        segmenter_class: type[SamSegmenter] = ExportingSamSegmenter
        backbone: Backbone = _sam_backbone(info, model, directory, **options)
    else:
        segmenter_class = SamSegmenter
        backbone = _sam2_backbone(info, model, directory, **options)
    return segmenter_class(backbone, info.name, device, autocast=autocast, checkpoint=directory)


def _sam_backbone(
    info: HfModel, model: Any, directory: Path | None, *, hq_token_only: bool = False
) -> SamHfBackbone:
    from transformers import SamHQProcessor, SamImageProcessor, SamProcessor

    hq = info.family.key == "sam_hq"
    image_processor = load_image_processor(SamImageProcessor, directory)
    processor = (SamHQProcessor if hq else SamProcessor)(image_processor=image_processor)
    return SamHfBackbone(model, processor, hq=hq, hq_token_only=hq_token_only)


def _sam2_backbone(
    info: HfModel, model: Any, directory: Path | None, *, fuse_backbone: bool = True
) -> Sam2HfBackbone:
    from transformers import Sam2ImageProcessor, Sam2Processor

    channels_last = info.family.key == "edgetam" and fuse_backbone and optimize_edgetam(model)
    image_processor = load_image_processor(Sam2ImageProcessor, directory)
    processor = Sam2Processor(
        image_processor=image_processor, target_size=int(image_processor.size["height"])
    )
    return Sam2HfBackbone(model, processor, family=info.family.key, channels_last=channels_last)
