"""Loading a transformers model from a local directory, checked: the right files, the right family
(``config.json``'s ``model_type``), the right size (``HfModel.fingerprint``), every weight present
and well shaped, safetensors only. Every refusal names the file and what was expected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError
from backends.models.hf import HfModel
from backends.models.torch_utils import first_few

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX = "model.safetensors.index.json"


def _lookup(config: Any, dotted: str) -> Any:
    """``config.a.b`` for ``"a.b"`` on a transformers config (sub-configs are attributes)."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        if value is None:
            return None
    return list(value) if isinstance(value, tuple) else value


def _hint(info: HfModel) -> str:
    return (
        f"`tapmask weights {info.name}` downloads it (or pass checkpoint=DIR, or set "
        f"{info.family.env} / TAPMASK_MODELS_DIR)"
    )


def _expected(info: HfModel) -> str:
    types = " or ".join(repr(t) for t in info.family.model_types)
    return f"a {info.family.label} model ({info.family.model_class}, model_type {types})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc


def _last_line(exc: Exception) -> str:
    """The gist of a transformers error (they often end a long explanation with it)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def check_directory(info: HfModel, directory: Path) -> dict:
    """Refuse, with the file and the expected model type named, anything that is not a
    transformers directory of ``info``'s family. Returns the parsed ``config.json``."""
    expected = _expected(info)
    if directory.is_file():
        extra = ""
        if info.family.key == "sam" and directory.suffix in (".pth", ".pt"):
            extra = (
                "; a segment-anything .pth converts with `tapmask weights --convert SRC DIR` "
                "(backends.models.hf.convert_sam_checkpoint)"
            )
        raise ModelLoadError(
            f"{directory} is a file; {info.name!r} loads a directory holding config.json + "
            f"{WEIGHTS_FILE} of {expected}{extra}"
        )
    if not directory.is_dir():
        raise ModelLoadError(
            f"model directory {directory} for {info.name!r} not found (it should hold "
            f"config.json + {WEIGHTS_FILE} of {expected}); {_hint(info)}"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{config_path} not found: {info.name!r} needs config.json + {WEIGHTS_FILE} of "
            f"{expected}; {_hint(info)}"
        )
    if not (directory / WEIGHTS_FILE).is_file() and not (directory / SHARDED_INDEX).is_file():
        pickled = sorted(p.name for pattern in ("*.bin", "*.pth") for p in directory.glob(pattern))
        note = (
            f" ({', '.join(pickled)} present, but pickled weights are never loaded)"
            if pickled
            else ""
        )
        raise ModelLoadError(
            f"{directory / WEIGHTS_FILE} not found{note}: {info.name!r} needs {expected} in "
            f"safetensors; {_hint(info)}"
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} is not a transformers config (not a JSON object)")
    model_type = config.get("model_type")
    if model_type not in info.family.model_types:
        raise ModelLoadError(
            f"{config_path} declares model_type {model_type!r}, but {info.name!r} needs "
            f"{expected}; is {directory} the right directory?"
        )
    return config


def load_config(model_class: Any, info: HfModel, directory: Path) -> Any:
    """The model's config class read from ``config.json`` (defaults filled in), so size checks
    do not depend on which values a given transformers version wrote out."""
    try:
        return model_class.config_class.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read {directory / 'config.json'} as a {model_class.config_class.__name__} "
            f"for {info.name!r}: {_last_line(exc)}"
        ) from exc


def check_variant(info: HfModel, config: Any, directory: Path) -> None:
    """Refuse a model of the right family but another size than ``info`` names."""
    wrong = [
        f"{path}={_lookup(config, path)!r} (expected {value!r})"
        for path, value in info.fingerprint.items()
        if _lookup(config, path) != value
    ]
    if wrong:
        raise ModelLoadError(
            f"{directory / 'config.json'} is a {info.family.label} model of another size than "
            f"{info.name!r}: {'; '.join(wrong)}"
        )


def load_checked(
    model_class: Any,
    info: HfModel,
    directory: Path,
    *,
    variant: bool = True,
    requires: Callable[[], None] | None = None,
) -> Any:
    """``check_directory``, the family's ``requires()`` (extra packages), the config, the size
    check (``variant``), then the weights."""
    check_directory(info, directory)
    if requires is not None:
        requires()
    config = load_config(model_class, info, directory)
    if variant:
        check_variant(info, config, directory)
    return load_pretrained(model_class, info, directory, config)


def load_pretrained(model_class: Any, info: HfModel, directory: Path, config: Any = None) -> Any:
    """``from_pretrained(local_files_only=True, use_safetensors=True)``, float32, checked: missing
    or mis-shaped weights are errors (transformers would silently re-initialise them)."""
    options = {} if config is None else {"config": config}
    try:
        model, loading = model_class.from_pretrained(
            str(directory),
            **options,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as exc:  # safetensors, shape, config errors all land here
        raise ModelLoadError(
            f"cannot load {info.family.model_class} for {info.name!r} from {directory}: "
            + _last_line(exc)
        ) from exc
    problems = []
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in loading.get("mismatched_keys") or ())
    if missing:
        problems.append(f"missing weights: {first_few(missing)}")
    if mismatched:
        problems.append(f"mis-shaped weights: {first_few(mismatched)}")
    if problems:
        raise ModelLoadError(
            f"{directory / WEIGHTS_FILE} does not match its config.json for {info.name!r}: "
            + "; ".join(problems)
        )
    unexpected = sorted(loading.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s: %s holds unused weights: %s", info.name, directory, first_few(unexpected))
    return model.eval()


def _has_image_processor_config(directory: Path) -> Path | None:
    """``preprocessor_config.json``, or a ``processor_config.json`` that nests the image
    processor's settings (what ``ProcessorMixin.save_pretrained`` writes in transformers 5)."""
    legacy = directory / "preprocessor_config.json"
    if legacy.is_file():
        return legacy
    nested = directory / "processor_config.json"
    if nested.is_file():
        content = _read_json(nested)
        if isinstance(content, dict) and isinstance(content.get("image_processor"), dict):
            return nested
    return None


def load_image_processor(image_processor_class: Any, directory: Path | None) -> Any:
    """The directory's image-processor settings if it has them, else the class defaults (those
    of the official models; some hub repositories ship no processor files)."""
    source = _has_image_processor_config(directory) if directory is not None else None
    if source is None:
        return image_processor_class()
    try:
        return image_processor_class.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read the image processor settings in {source}: {exc}"
        ) from exc
