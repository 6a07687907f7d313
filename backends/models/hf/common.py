"""What every transformers family shares: checked loading from a local directory, the cached
embedding, the shared-cache byte format, and the click loop of ``SamPredictor.predict``.

Behaviour mirrors ``backends.models.sam``:

* ``encode`` runs the image processor and ``get_image_embeddings`` once per image (bf16 autocast
  on CUDA, float32 on the CPU); the result (``HfEmbedding``) is all the decoder needs, so the
  Engine caches it and accounts its real bytes.
* ``decode``: the first click asks for three masks (``multimask_output=True``) and keeps the one
  with the best predicted IoU; a box alone asks for one; later clicks feed the previous best
  low-resolution logits back as ``input_masks``. ``score`` is the predicted IoU.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.errors import ModelLoadError
from backends.models.hf import HfModel
from backends.models.torch_utils import auto_device, check_embedding_matches, rgb
from backends.prompts import Prompt, Segmentation

log = logging.getLogger(__name__)

_SHARED_FORMAT = "tapmask-hf-embedding/1"
WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------
# Loading


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
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path} is not readable JSON: {exc}") from exc
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
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot read {directory / 'config.json'} as a {model_class.config_class.__name__} "
            f"for {info.name!r}: {message}"
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
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load {info.family.model_class} for {info.name!r} from {directory}: {message}"
        ) from exc
    problems = []
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in loading.get("mismatched_keys") or ())
    if missing:
        problems.append(f"missing weights: {_first(missing)}")
    if mismatched:
        problems.append(f"mis-shaped weights: {_first(mismatched)}")
    if problems:
        raise ModelLoadError(
            f"{directory / WEIGHTS_FILE} does not match its config.json for {info.name!r}: "
            + "; ".join(problems)
        )
    unexpected = sorted(loading.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s: %s holds unused weights: %s", info.name, directory, _first(unexpected))
    return model.eval()


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items)} in all)" if len(items) > n else "")


def _has_image_processor_config(directory: Path) -> Path | None:
    """``preprocessor_config.json``, or a ``processor_config.json`` that nests the image
    processor's settings (what ``ProcessorMixin.save_pretrained`` writes in transformers 5)."""
    legacy = directory / "preprocessor_config.json"
    if legacy.is_file():
        return legacy
    nested = directory / "processor_config.json"
    if nested.is_file():
        try:
            content = json.loads(nested.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"{nested} is not readable JSON: {exc}") from exc
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


# --------------------------------------------------------------------------------------------
# Embedding


@dataclass(frozen=True, eq=False)
class HfEmbedding:
    """One image's encoder output: every tensor the mask decoder needs, float32 on the model's
    device, plus the sizes that map prompts and masks back to the image.

    ``tensors``: SAM: the ``[1, 256, 64, 64]`` image embedding; HQ-SAM: that plus the first
    global-attention block's ViT features (``[1, 64, 64, width]``); SAM 2.1 / EdgeTAM: the two
    high-resolution feature maps (``[1, 32, 256, 256]``, ``[1, 64, 128, 128]``) and the image
    embedding (``[1, 256, 64, 64]``), in ``get_image_embeddings`` order.
    ``original_size``: the image's (H, W); ``input_size``: its (H, W) in the model's input frame
    before padding (SAM: longest side 1024; SAM 2: 1024×1024, the image is stretched).
    """

    tensors: tuple[torch.Tensor, ...]
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(sum(t.element_size() * t.nelement() for t in self.tensors))

    def to_numpy(self) -> list[np.ndarray]:
        return [t.detach().to("cpu", torch.float32).numpy().copy() for t in self.tensors]


# --------------------------------------------------------------------------------------------
# Segmenter


class HfSegmenter:
    """A transformers SAM-like model behind the ``Segmenter`` protocol (no per-image state)."""

    replays_history = True
    family = ""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        device: str | torch.device | None = None,
        *,
        autocast: bool | None = None,
        directory: Path | None = None,
    ) -> None:
        self.name = name
        self.directory = directory
        self.device = auto_device(device)
        try:
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:  # device="cuda" on a CPU-only build
            raise ModelLoadError(f"cannot put {name} on device {device!r}: {exc}") from exc
        self.processor = processor
        if autocast is None:
            autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = bool(autocast) and self.device.type == "cuda"
        self._lock = threading.Lock()
        self.encode_calls = 0  # image-encoder runs, for tests and metrics

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}{where})"

    # -- family hooks ------------------------------------------------------------------------

    def expected_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``HfEmbedding.tensors`` this model makes (validates shared embeddings)."""
        raise NotImplementedError

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixel values for the encoder and the image's size in the input frame."""
        raise NotImplementedError

    def _image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _prompt_inputs(self, prompt: Prompt, embedding: HfEmbedding) -> dict[str, torch.Tensor]:
        """``input_points`` / ``input_labels`` / ``input_boxes`` in the model's input frame."""
        raise NotImplementedError

    def _forward(
        self,
        embedding: HfEmbedding,
        inputs: dict[str, torch.Tensor],
        input_masks: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred_masks [1, 1, C, h, w], iou_scores [1, 1, C])`` from the mask decoder."""
        raise NotImplementedError

    def _upscale(self, logits: torch.Tensor, embedding: HfEmbedding) -> np.ndarray:
        """The chosen low-res logits ``[1, 1, h, w]`` → a boolean H×W mask."""
        raise NotImplementedError

    def _next_state(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy().copy()

    # -- per image ---------------------------------------------------------------------------

    def encode(self, image: np.ndarray) -> HfEmbedding:
        image = rgb(image)
        if not image.flags.writeable:  # the Engine's cached images are read-only; torch warns
            image = image.copy()
        with torch.inference_mode():
            pixel_values, input_size = self._preprocess(image)
            pixel_values = pixel_values.to(self.device, torch.float32)  # keeps the memory format
            if self.autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    tensors = self._image_embeddings(pixel_values)
            else:
                tensors = self._image_embeddings(pixel_values)
            tensors = tuple(t.float().contiguous() for t in tensors)
        with self._lock:
            self.encode_calls += 1
        return HfEmbedding(tensors, (int(image.shape[0]), int(image.shape[1])), input_size)

    # -- sharing between processes (the Engine's shared embedding tier) -----------------------

    def embedding_to_bytes(self, embedding: HfEmbedding) -> bytes:
        """A small JSON header (format, family, shapes, sizes) + every tensor in fp16."""
        arrays = [
            t.detach().to("cpu", torch.float16).contiguous().numpy() for t in embedding.tensors
        ]
        header = json.dumps(
            {
                "format": _SHARED_FORMAT,
                "family": self.family,
                "shapes": [list(a.shape) for a in arrays],
                "original_size": list(embedding.original_size),
                "input_size": list(embedding.input_size),
            }
        ).encode()
        return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays)

    def embedding_from_bytes(self, data: bytes) -> HfEmbedding:
        """Inverse of ``embedding_to_bytes``; float32 tensors on this model's device."""
        (length,) = struct.unpack_from("<I", data)
        header = json.loads(bytes(data[4 : 4 + length]))
        if header.get("format") != _SHARED_FORMAT or header.get("family") != self.family:
            raise ValueError(
                f"not a shared {self.family} embedding: "
                f"{header.get('format')!r}/{header.get('family')!r}"
            )
        shapes = [tuple(int(v) for v in shape) for shape in header["shapes"]]
        expected = self.expected_shapes()
        if shapes != expected:
            raise ValueError(f"shared embedding has shapes {shapes}, this model makes {expected}")
        values = np.frombuffer(data, dtype=np.float16, offset=4 + length)
        if values.size != sum(int(np.prod(shape)) for shape in shapes):
            raise ValueError("truncated shared embedding")
        tensors = []
        offset = 0
        for shape in shapes:
            size = int(np.prod(shape))
            array = values[offset : offset + size].reshape(shape).astype(np.float32)
            tensors.append(torch.from_numpy(array).to(self.device))
            offset += size
        original = tuple(int(v) for v in header["original_size"])
        input_size = tuple(int(v) for v in header["input_size"])
        return HfEmbedding(tuple(tensors), original, input_size)  # type: ignore[arg-type]

    # -- per click ---------------------------------------------------------------------------

    def mask_input_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.model.prompt_encoder.mask_input_size)  # type: ignore[return-value]

    def _mask_input(self, state: Any) -> torch.Tensor:
        size = self.mask_input_size()
        tensor = torch.as_tensor(np.asarray(state), dtype=torch.float32, device=self.device)
        if tensor.numel() != size[0] * size[1]:
            raise ValueError(
                f"{self.name} state must be {size} low-res logits, got {tuple(tensor.shape)}"
            )
        return tensor.reshape(1, 1, *size)

    def decode(
        self, image: np.ndarray, embedding: HfEmbedding, prompt: Prompt, state: Any | None
    ) -> tuple[Segmentation, np.ndarray]:
        """One prompt, continuing from ``state`` (the previous best low-res logits).

        * First decode with clicks: three candidates, the best predicted IoU is kept.
        * A box alone: one mask (``multimask_output=False``).
        * Later clicks: the previous logits go in as ``input_masks``, one mask out.

        ``prompt.previous_mask`` is ignored, as for SAM: ``input_masks`` must be the decoder's own
        logits; the Engine replays the click history instead (``replays_history``).
        Returns the mask at the image's size, its predicted IoU as score and the chosen low-res
        logits (float32 ``[1, 1, 256, 256]`` numpy array) as the next state.
        """
        if not isinstance(embedding, HfEmbedding):
            raise TypeError(f"expected an HfEmbedding from {self.name}.encode, got {embedding!r}")
        check_embedding_matches(image, embedding.original_size)
        with torch.inference_mode():
            inputs = self._prompt_inputs(prompt, embedding)
            if state is None:
                input_masks = None
                multimask = bool(prompt.clicks)  # a box alone is unambiguous enough
            else:
                input_masks = self._mask_input(state)
                multimask = False
            pred_masks, iou_scores = self._forward(embedding, inputs, input_masks, multimask)
            iou = iou_scores.reshape(-1)
            best = int(torch.argmax(iou)) if multimask else 0
            logits = pred_masks[0, :, best : best + 1].float()  # [1, 1, h, w]
            mask = self._upscale(logits, embedding)
            score = float(iou[best])
            new_state = self._next_state(logits)
        return Segmentation(mask=mask, score=score, model=self.name), new_state


def click_arrays(prompt: Prompt) -> tuple[list[list[float]], list[int]]:
    """Clicks as ``[[x, y], …]`` image pixels and ``[1 | 0, …]`` labels."""
    return (
        [[c.x, c.y] for c in prompt.clicks],
        [1 if c.positive else 0 for c in prompt.clicks],
    )
