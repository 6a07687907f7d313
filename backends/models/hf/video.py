"""SAM 2.1 and EdgeTAM video trackers through ``transformers`` (``Sam2VideoModel``,
``EdgeTamVideoModel`` and their inference sessions), one frame per request.

Tools send one frame at a time, so the tracker never holds a video: each request builds a fresh
streaming inference session, puts the object's memory back into it, runs the model on the new
frame and takes the memory out again as the object's state (``VideoState``):

* the conditioning frame (where the tool's shape initialised the object: box and clicks → SAM
  prompt points, mask or polygon → mask input) with its memory features and object pointer;
* the recent frames the official predictor reads: the memory features of the last
  ``num_maskmem - 1`` frames (6) and the object pointers of the last
  ``max_object_pointers_in_encoder - 1`` frames (15); older frames are dropped. The session would
  otherwise keep every frame's outputs and pixels, so memory grows with the video; here a state
  is bounded (about 7 frames of memory features) whatever the video's length.

Frame indices count requests for this object (0 at the conditioning frame), the temporal offsets
the model's memory attention uses. "Backward" is the same as forward here: the tool sends the
previous frame instead of the next one, and the memory treats it as the next frame asked for.

States are canonical fp16 (memory features, positional encodings, pointers), in memory as in
the shared tier, so a frame gives the same answer whichever worker serves it. Models load from
a checked local directory exactly like the image models (``backends.models.hf.loading``:
safetensors only, ``config.json`` family and size checks), from the same directory: the official
``facebook/sam2.1-*`` and EdgeTAM checkpoints hold the video model.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backends.errors import ModelLoadError
from backends.models.hf import HfModel, model_directory, model_info
from backends.models.hf.families import optimize_edgetam
from backends.models.hf.loading import load_checked, load_image_processor
from backends.models.sizes import EDGETAM_BACKBONE, HIERA_SIZES
from backends.models.tracking import Tracked
from backends.prompts import TrackTarget

#: Outputs the model keeps per frame that the memory never reads again (low/high-res masks).
_DROPPED = frozenset({"pred_masks", "high_res_masks"})
#: What a frame beyond the memory-feature window still contributes: its object pointer.
_POINTER_KEYS = ("object_pointer", "object_score_logits")
#: The memory's positional encoding depends on the feature map's size only: the conditioning
#: frame keeps it, the other frames share that copy.
_SHARED = "maskmem_pos_enc"
_FP16_MAX = 65504.0

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class VideoState:
    """One object's memory after frame ``frame`` (see the module docstring). Never mutated."""

    frame: int
    cond: Outputs
    recent: tuple[tuple[int, Outputs], ...]  # (frame index, outputs), oldest first
    nbytes: int = field(default=0)


def _canonical(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` through fp16 and back to its dtype: what the shared tier would give back."""
    dtype = tensor.dtype
    half = tensor.detach().to("cpu", torch.float32).clamp(-_FP16_MAX, _FP16_MAX).half()
    return half.to(dtype)


def _keep(outputs: dict[str, Any], *, shared: bool = True) -> Outputs:
    kept = {}
    for key, value in outputs.items():
        if key in _DROPPED or (key == _SHARED and not shared):
            continue
        if isinstance(value, torch.Tensor):
            kept[key] = _canonical(value)
    return kept


def _size(state_parts: list[Outputs]) -> int:
    return sum(t.numel() * t.element_size() for part in state_parts for t in part.values())


class VideoTracker:
    """A transformers video model as a ``Tracker`` (and ``SharesTrackState``)."""

    def __init__(
        self, model: Any, image_processor: Any, name: str, family: str, device: Any = None
    ) -> None:
        import transformers

        self.name = name
        self.family = family
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        session = "EdgeTamVideoInferenceSession" if family == "edgetam_video" else None
        self._session_class = getattr(
            transformers, session or "Sam2VideoInferenceSession", None
        ) or self._find_session_class(model)
        config = model.config
        self.num_maskmem = int(config.num_maskmem)
        self.max_pointers = int(config.max_object_pointers_in_encoder)
        self.target_size = int(image_processor.size["height"])

    @staticmethod
    def _find_session_class(model: Any) -> Any:
        import importlib

        module = importlib.import_module(type(model).__module__)
        for attribute in vars(module).values():
            if isinstance(attribute, type) and attribute.__name__.endswith("InferenceSession"):
                return attribute
        raise ModelLoadError(f"no inference session class next to {type(model).__name__}")

    @property
    def memory_frames(self) -> int:
        """Frames whose memory features a state keeps besides the conditioning frame."""
        return self.num_maskmem - 1

    @property
    def pointer_frames(self) -> int:
        """Frames whose object pointers a state keeps besides the conditioning frame."""
        return max(self.num_maskmem, self.max_pointers) - 1

    # -- one frame -------------------------------------------------------------------------
    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        if not image.flags.writeable:
            image = image.copy()
        processed = self.image_processor(
            images=image, return_tensors="pt", input_data_format="channels_last"
        )
        return processed["pixel_values"].to(self.device)

    def _session(self, height: int, width: int) -> Any:
        return self._session_class(
            video_height=height,
            video_width=width,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
        )

    def _answer(self, output: Any, height: int, width: int) -> Tracked:
        logits = output.pred_masks[:1].float()
        mask = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        present = float(torch.sigmoid(output.object_score_logits.float().reshape(-1)[0]))
        mask_np = (mask[0, 0] > 0).cpu().numpy()
        return Tracked(mask_np, present, lost=present < 0.5)

    def _state(self, session: Any, frame: int, previous: VideoState | None) -> VideoState:
        outputs = session.output_dict_per_obj[0]
        if previous is None:
            cond = _keep(outputs["cond_frame_outputs"][frame])
            recent: list[tuple[int, Outputs]] = []
        else:
            cond = previous.cond
            recent = list(previous.recent)
            recent.append((frame, _keep(outputs["non_cond_frame_outputs"][frame], shared=False)))
        recent = recent[-self.pointer_frames :] if self.pointer_frames > 0 else []
        window = frame - self.memory_frames + 1  # the next frame reads these
        trimmed = tuple(
            (index, out if index >= window else {k: out[k] for k in _POINTER_KEYS if k in out})
            for index, out in recent
        )
        return VideoState(frame, cond, trimmed, _size([cond, *(o for _, o in trimmed)]))

    @torch.inference_mode()
    def start(self, image: np.ndarray, target: TrackTarget) -> tuple[Tracked, VideoState]:
        height, width = image.shape[:2]
        session = self._session(height, width)
        obj_idx = session.obj_id_to_idx(0)
        if target.box is not None or target.clicks:
            sx, sy = self.target_size / width, self.target_size / height
            points, labels = [], []
            if target.box is not None:  # a box is two points labelled 2 and 3, first
                b = target.box
                points += [[b.x1 * sx, b.y1 * sy], [b.x2 * sx, b.y2 * sy]]
                labels += [2, 3]
            for click in target.clicks:
                points.append([click.x * sx, click.y * sy])
                labels.append(1 if click.positive else 0)
            coords = torch.tensor([[points]], dtype=torch.float32)
            session.add_point_inputs(
                obj_idx,
                0,
                {
                    "point_coords": coords,
                    "point_labels": torch.tensor([[labels]], dtype=torch.int32),
                },
            )
        else:
            mask = torch.from_numpy(target.shape_mask(width, height).astype(np.float32))
            mask = F.interpolate(
                mask[None, None],
                size=(self.target_size, self.target_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            session.add_mask_inputs(obj_idx, 0, (mask >= 0.5).float())
        session.obj_with_new_inputs = [0]
        output = self.model(inference_session=session, frame=self._pixels(image), frame_idx=0)
        return self._answer(output, height, width), self._state(session, 0, None)

    @torch.inference_mode()
    def step(self, image: np.ndarray, state: VideoState) -> tuple[Tracked, VideoState]:
        height, width = image.shape[:2]
        session = self._session(height, width)
        outputs = session.output_dict_per_obj[session.obj_id_to_idx(0)]
        device = self.device
        cond = {k: v.to(device) for k, v in state.cond.items()}
        outputs["cond_frame_outputs"][0] = cond
        for index, out in state.recent:
            restored = {k: v.to(device) for k, v in out.items()}
            if "maskmem_features" in restored:
                restored[_SHARED] = cond[_SHARED]
            outputs["non_cond_frame_outputs"][index] = restored
        frame = state.frame + 1
        output = self.model(inference_session=session, frame=self._pixels(image), frame_idx=frame)
        return self._answer(output, height, width), self._state(session, frame, state)

    # -- SharesTrackState ------------------------------------------------------------------
    def state_to_bytes(self, state: VideoState) -> bytes:
        arrays: dict[str, np.ndarray] = {"frame": np.array([state.frame], np.int64)}
        for key, tensor in state.cond.items():
            arrays[f"c.{key}"] = tensor.float().half().numpy()
        for position, (index, out) in enumerate(state.recent):
            arrays[f"i.{position}"] = np.array([index], np.int64)
            for key, tensor in out.items():
                arrays[f"r.{position}.{key}"] = tensor.float().half().numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def state_from_bytes(self, data: bytes) -> VideoState:
        """A state from the shared tier; ``ValueError`` for anything else (truncated, foreign)."""
        try:
            return self._state_from_bytes(data)
        except (OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"unreadable video tracker state: {exc}") from exc

    def _state_from_bytes(self, data: bytes) -> VideoState:
        dtypes = {"maskmem_features": torch.bfloat16}
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "frame" not in archive.files:
                raise ValueError("not a video tracker state")
            frame = int(archive["frame"][0])
            cond: Outputs = {}
            recent: dict[int, tuple[int, Outputs]] = {}
            for name in archive.files:
                if name.startswith("c."):
                    key = name[2:]
                    cond[key] = torch.from_numpy(archive[name]).to(dtypes.get(key, torch.float32))
                elif name.startswith("r."):
                    _, position, key = name.split(".", 2)
                    slot = recent.setdefault(int(position), (-1, {}))
                    value = torch.from_numpy(archive[name]).to(dtypes.get(key, torch.float32))
                    slot[1][key] = value
                elif name.startswith("i."):
                    position = int(name[2:])
                    index = int(archive[name][0])
                    recent[position] = (index, recent.get(position, (-1, {}))[1])
        if not {"object_pointer", "maskmem_features", _SHARED} <= cond.keys():
            raise ValueError("not a video tracker state")
        if len(recent) > self.pointer_frames or any(i < 0 for i, _ in recent.values()):
            raise ValueError("video tracker state: malformed recent frames")
        width = cond["object_pointer"].shape[-1]
        if width != int(self.model.hidden_dim):
            raise ValueError(f"video tracker state of another model (pointer width {width})")
        ordered = tuple(recent[p] for p in sorted(recent))
        return VideoState(frame, cond, ordered, _size([cond, *(o for _, o in ordered)]))


def default_video_config(info: HfModel, **overrides: Any) -> Any:
    """The official architecture of a video model (random weights: benchmarks, tests)."""
    import transformers

    if info.family.key == "sam2_video":
        kwargs: dict[str, Any] = {"vision_config": HIERA_SIZES[info.variant].hf_vision_config()}
    else:
        # EdgeTamVideoConfig's default vision config is SAM 2's Hiera (transformers 5.25): the
        # official config.json names its RepViT encoder explicitly, and so must this one.
        backbone = transformers.TimmWrapperConfig(**EDGETAM_BACKBONE)
        kwargs = {
            "vision_config": {"model_type": "edgetam_vision_model", "backbone_config": backbone}
        }
    kwargs["vision_config"].update(overrides.pop("vision_config", {}))
    config_class = getattr(transformers, info.family.model_class).config_class
    return config_class(**kwargs, **overrides)


def build(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: Any = None,
    *,
    check_variant: bool = True,
    random_weights: bool = False,
    fuse_backbone: bool = True,
) -> VideoTracker:
    """Registry factory for ``<model>-video`` names (``backends.models.hf.VIDEO_MODELS``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            f"model {name!r} needs transformers (pip install 'tapmask[hf]')"
        ) from exc
    info = model_info(name)
    model_class = getattr(transformers, info.family.model_class)
    directory = None
    if random_weights:
        if checkpoint is not None:
            raise ModelLoadError("random_weights=True and a checkpoint are mutually exclusive")
        model = model_class(default_video_config(info)).eval()
    else:
        directory = model_directory(name, checkpoint)
        model = load_checked(model_class, info, directory, variant=check_variant)
    if info.family.key == "edgetam_video" and fuse_backbone:
        optimize_edgetam(model)
    image_processor = load_image_processor(transformers.Sam2ImageProcessor, directory)
    return VideoTracker(model, image_processor, name, info.family.key, device)
