"""The official sizes of the SAM-style image encoders, in one torch-free table.

Everything that needs a size reads it here: the segment-anything builder
(``backends.models.sam.loader``), the transformers name table and its size fingerprints
(``backends.models.hf``), the transformers default configs (``random_weights`` builds) and the
segment-anything → transformers converter. Importing this module costs nothing (no torch, no
transformers), so the registry and the CLI can use it on machines without the model stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.errors import ModelLoadError

# --------------------------------------------------------------------------------------------
# SAM: ViT image encoder + prompt encoder + mask decoder (segment-anything and transformers)


@dataclass(frozen=True)
class SamArchitecture:
    """Every size of a segment-anything ``Sam``, named as ``segment_anything.build_sam`` names
    them. The defaults are SAM's; the four encoder sizes pick vit_b / vit_l / vit_h, tiny values
    give fast test models."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    """The ViT image encoder: width, blocks, heads, and the blocks that attend globally (the
    others attend within windows)."""
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    """Input side (images are resized and padded to it), patch side, attention window side."""
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    """Prompt encoder width (also the image embedding's channels), mask-input channels."""
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    """The mask decoder's two-way transformer."""
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    """The IoU prediction head, and how many candidates a multimask answer holds."""

    @classmethod
    def of(cls, value: SamArchitecture | Mapping[str, Any]) -> SamArchitecture:
        """``value`` itself, or the architecture its keys name (``architecture=`` options come
        as JSON objects); unknown keys or missing encoder sizes are a ``ModelLoadError``."""
        if isinstance(value, SamArchitecture):
            return value
        try:
            fields = dict(value)
            fields["encoder_global_attn_indexes"] = tuple(
                int(i) for i in fields["encoder_global_attn_indexes"]
            )
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"bad SAM architecture {value!r}: {exc}") from exc

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding (64 for the official 1024 input, 16-pixel patches)."""
        return self.image_size // self.patch_size

    def hf_config(self) -> dict[str, dict[str, Any]]:
        """The same model as transformers ``SamConfig`` keyword arguments."""
        return {
            "vision_config": {
                "hidden_size": self.encoder_embed_dim,
                "num_hidden_layers": self.encoder_depth,
                "num_attention_heads": self.encoder_num_heads,
                "global_attn_indexes": list(self.encoder_global_attn_indexes),
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "window_size": self.window_size,
                "output_channels": self.prompt_embed_dim,
                "num_pos_feats": self.prompt_embed_dim // 2,
            },
            "prompt_encoder_config": {
                "hidden_size": self.prompt_embed_dim,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "mask_input_channels": self.mask_in_chans,
            },
            "mask_decoder_config": {
                "hidden_size": self.prompt_embed_dim,
                "num_hidden_layers": self.decoder_depth,
                "mlp_dim": self.decoder_mlp_dim,
                "num_attention_heads": self.decoder_num_heads,
                "iou_head_depth": self.iou_head_depth,
                "iou_head_hidden_dim": self.iou_head_hidden_dim,
                "num_multimask_outputs": self.num_multimask_outputs,
            },
        }

    def hf_fingerprint(self) -> dict[str, Any]:
        """``config.json`` values that tell this size from the other official ones."""
        return {
            "vision_config.hidden_size": self.encoder_embed_dim,
            "vision_config.num_hidden_layers": self.encoder_depth,
        }


#: The official SAM checkpoints (Meta's ``sam_vit_*.pth``, ``facebook/sam-vit-*``, HQ-SAM's).
SAM_VIT_SIZES: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
}

#: The segment-anything state-dict key whose width tells the official sizes apart.
PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"


def sam_variant(state_dict: Mapping[str, Any]) -> str:
    """vit_b / vit_l / vit_h of a segment-anything state dict, from the patch embedding's width
    (768 / 1024 / 1280); a ``ModelLoadError`` for anything else."""
    weight = state_dict.get(PATCH_EMBED_KEY)
    if weight is None or len(getattr(weight, "shape", ())) != 4:
        raise ModelLoadError(
            f"cannot tell the SAM variant: the checkpoint has no {PATCH_EMBED_KEY!r} tensor "
            "(is it a segment-anything checkpoint?)"
        )
    width = int(weight.shape[0])
    by_width = {arch.encoder_embed_dim: variant for variant, arch in SAM_VIT_SIZES.items()}
    if width not in by_width:
        raise ModelLoadError(
            f"cannot tell the SAM variant: image-encoder width {width} is none of "
            f"{sorted(by_width)} (vit_b/vit_l/vit_h); pass architecture=... for other sizes"
        )
    return by_width[width]


# --------------------------------------------------------------------------------------------
# SAM 2.1: Hiera image encoder (transformers ``Sam2HieraDetConfig``)


@dataclass(frozen=True)
class HieraSize:
    """One official SAM 2.1 Hiera backbone (``sam2.1_hiera_{t,s,b+,l}.yaml``). Every stage
    doubles the width and the heads of the one before."""

    hidden_size: int
    blocks_per_stage: tuple[int, ...]
    global_attention_blocks: tuple[int, ...]
    num_attention_heads: int = 1
    window_size_per_stage: tuple[int, ...] = (8, 4, 14, 7)
    window_positional_embedding_background_size: tuple[int, int] = (7, 7)

    @property
    def embed_dim_per_stage(self) -> list[int]:
        return [self.hidden_size << stage for stage in range(len(self.blocks_per_stage))]

    def hf_vision_config(self) -> dict[str, Any]:
        """``Sam2VisionConfig`` keyword arguments for this backbone."""
        heads = [self.num_attention_heads << s for s in range(len(self.blocks_per_stage))]
        backbone = {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "blocks_per_stage": list(self.blocks_per_stage),
            "embed_dim_per_stage": self.embed_dim_per_stage,
            "num_attention_heads_per_stage": heads,
            "global_attention_blocks": list(self.global_attention_blocks),
            "window_size_per_stage": list(self.window_size_per_stage),
            "window_positional_embedding_background_size": list(
                self.window_positional_embedding_background_size
            ),
        }
        return {
            "backbone_config": backbone,
            "backbone_channel_list": list(reversed(self.embed_dim_per_stage)),
        }

    def hf_fingerprint(self) -> dict[str, Any]:
        prefix = "vision_config.backbone_config"
        return {
            f"{prefix}.hidden_size": self.hidden_size,
            f"{prefix}.blocks_per_stage": list(self.blocks_per_stage),
        }


HIERA_SIZES: dict[str, HieraSize] = {
    "tiny": HieraSize(96, (1, 2, 7, 2), (5, 7, 9)),
    "small": HieraSize(96, (1, 2, 11, 2), (7, 10, 13)),
    "base-plus": HieraSize(
        112, (2, 3, 16, 3), (12, 16, 20), 2, window_positional_embedding_background_size=(14, 14)
    ),
    "large": HieraSize(144, (2, 6, 36, 4), (23, 33, 43), 2, window_size_per_stage=(8, 4, 16, 8)),
}


#: A SAM with the official prompt encoder / mask decoder structure and 1024 input (so low-res
#: logits are 256×256 and the ResizeLongestSide transform is the real one), every width and
#: depth shrunk so a forward pass takes milliseconds on a CPU: tests and ``bench-gpu --quick``.
TINY_SAM: dict[str, Any] = {
    "encoder_embed_dim": 32,
    "encoder_depth": 1,
    "encoder_num_heads": 1,
    "encoder_global_attn_indexes": (),
    "prompt_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


# --------------------------------------------------------------------------------------------
# EdgeTAM: SAM 2 heads on a RepViT-M1 image encoder (timm)

#: EdgeTAM's image encoder: timm's RepViT-M1, four feature levels (as in yonigozlan/EdgeTAM-hf).
#: Spelled out because ``EdgeTamConfig()``'s default misspells the key (``"archirecture"`` in
#: transformers 5.23), which silently builds timm's default architecture, a ResNet-50.
EDGETAM_BACKBONE: dict[str, Any] = {
    "architecture": "repvit_m1",
    "model_args": {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
}

#: RepViT-M1's feature widths, deepest first, and the FPN width of the official EdgeTAM.
EDGETAM_FINGERPRINT: dict[str, Any] = {
    "vision_config.backbone_channel_list": [384, 192, 96, 48],
    "vision_config.fpn_hidden_size": 256,
}
