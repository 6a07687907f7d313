"""Model names users type (``grabcut``, ``sam-vit_h``, ``ritm-h18``, ``grounding-dino-tiny``…) →
factories. A spec's ``kind`` says what its factory builds: a ``Segmenter`` (clicks and boxes →
mask) or a ``Detector`` (text → boxes, ``backends.models.detection``).

Factories import their heavy dependencies (torch, segment-anything) only when called, so importing
the registry, and everything that uses it, stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from backends.errors import ModelLoadError, ModelNotFound
from backends.models.base import Segmenter
from backends.models.detection import Detector
from backends.models.sizes import SAM_VIT_SIZES

Factory = Callable[..., Segmenter | Detector]
KINDS = ("segmenter", "detector")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    target: str  # "module:function", imported lazily
    description: str
    extra: str | None = None  # the pip extra that provides its dependencies
    kwargs: tuple[tuple[str, object], ...] = ()
    kind: str = "segmenter"  # or "detector"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {self.kind!r}")


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    _SPECS[spec.name] = spec


def names(kind: str | None = None) -> list[str]:
    """Every registered name, or those of one ``kind`` ("segmenter", "detector")."""
    return sorted(name for name, spec in _SPECS.items() if kind is None or spec.kind == kind)


def spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def create(name: str, **options: object) -> Segmenter | Detector:
    """Build model ``name``; ``options`` override the spec's defaults (checkpoint, device…)."""
    model_spec = spec(name)
    module_name, _, func_name = model_spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'tapmask[{model_spec.extra}]')" if model_spec.extra else ""
        raise ModelLoadError(f"model {name!r} needs {exc.name or exc}{hint}") from exc
    factory: Factory = getattr(module, func_name)
    kwargs = dict(model_spec.kwargs)
    kwargs.update(options)
    try:
        return factory(name=name, **kwargs)
    except TypeError as exc:  # an option this model family does not take
        raise ModelLoadError(f"model {name!r}: {exc}") from exc


register(
    ModelSpec(
        "grabcut",
        "backends.models.grabcut:build",
        "OpenCV GrabCut: weights-free, CPU only",
    )
)
for _variant in SAM_VIT_SIZES:
    register(
        ModelSpec(
            f"sam-{_variant}",
            "backends.models.sam.loader:build",
            f"Segment Anything {_variant.replace('_', '-').upper()} (segment-anything checkpoint)",
            extra="sam",
            kwargs=(("model_type", _variant),),
        )
    )
register(
    ModelSpec(
        "sam",
        "backends.models.sam.loader:build",
        "Segment Anything, variant read from the checkpoint (SAM_CHECKPOINT)",
        extra="sam",
    )
)
for _variant, _file, _arch in (
    ("h18", "coco_lvis_h18_itermask.pth", "HRNet18 + OCR64"),
    ("h18s", "coco_lvis_h18s_itermask.pth", "HRNet18s + OCR48"),
    ("h32", "coco_lvis_h32_itermask.pth", "HRNet32 + OCR128"),
):
    register(
        ModelSpec(
            f"ritm-{_variant}",
            "backends.models.ritm:build",
            f"RITM {_arch} click model, COCO+LVIS itermask (RITM_CHECKPOINT overrides)",
            extra="ritm",
            kwargs=(("default_checkpoint", _file), ("variant", _variant)),
        )
    )

from backends.models import hf as _hf  # noqa: E402  (the name table only: no torch/transformers)

for _info in _hf.MODELS.values():
    register(ModelSpec(_info.name, "backends.models.hf:build", _info.description, extra="hf"))
for _info in _hf.DETECTORS.values():
    register(
        ModelSpec(
            _info.name,
            "backends.models.hf:build_detector",
            _info.description,
            extra="hf",
            kind="detector",
        )
    )
