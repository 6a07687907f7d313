"""The weights-free default video tracker (``flow``): dense optical flow plus a GrabCut band.

Each step works at a reduced size (long side ``work_side``, default 640 px):

1. DIS optical flow (OpenCV, ``PRESET_FAST``) from the new frame back to the previous one; the
   previous mask is pulled along it (backward warping leaves no holes);
2. GrabCut refines the warped mask in a band around its boundary only: the eroded interior is
   sure foreground, everything beyond the dilated boundary sure background, so the colour
   models correct drift at the edges without flooding the frame;
3. the refined mask is scaled back to the frame (linear interpolation, threshold at 0.5).

The object is *lost* when its area falls under ``lost_fraction`` of the area it had when tracking
started, or collapses to under ``collapse_fraction`` of the previous frame's area in one step
(occluded, left the frame). A box starts from GrabCut inside the box (a rectangle holds
background too); clicks (with or without a box) from tapmask's GrabCut click model
(``backends.models.grabcut``); a polygon or mask starts from that shape as given.

The state is the previous working-size grey frame and mask (about 0.4 MB at 640×360), so memory
does not grow with the video; it crosses processes as a compressed ``npz`` (no pickle).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from backends.errors import ModelLoadError
from backends.models.grabcut import GrabCutSegmenter
from backends.models.tracking import Tracked
from backends.prompts import TrackTarget


@dataclass(frozen=True, eq=False)
class FlowState:
    gray: np.ndarray  # previous frame, working size, uint8
    mask: np.ndarray  # previous mask, working size, bool
    start_area: float  # working-size area when tracking started
    lost: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.gray.nbytes + self.mask.nbytes + 64)


class FlowTracker:
    """Optical-flow mask propagation with a GrabCut band refinement (see the module docs)."""

    def __init__(
        self,
        name: str = "flow",
        *,
        work_side: int = 640,
        band: float = 0.02,
        grabcut_iterations: int = 2,
        lost_fraction: float = 0.05,
        collapse_fraction: float = 0.2,
    ) -> None:
        self.name = name
        self.work_side = int(work_side)
        self.band = float(band)
        self.iterations = int(grabcut_iterations)
        self.lost_fraction = float(lost_fraction)
        self.collapse_fraction = float(collapse_fraction)
        self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
        self._clicks = GrabCutSegmenter(f"{name}-clicks")

    # -- sizes ---------------------------------------------------------------------------------
    def _work_size(self, image: np.ndarray) -> tuple[int, int]:
        height, width = image.shape[:2]
        scale = min(1.0, self.work_side / max(height, width))
        return max(1, round(width * scale)), max(1, round(height * scale))

    def _small(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self._work_size(image)
        rgb = (
            cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            if size != image.shape[1::-1]
            else image
        )
        return np.ascontiguousarray(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

    @staticmethod
    def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if mask.shape[::-1] == size:
            return mask.astype(bool)
        scaled = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        return scaled >= 0.5

    # -- Tracker -------------------------------------------------------------------------------
    def start(self, image: np.ndarray, target: TrackTarget) -> tuple[Tracked, FlowState]:
        height, width = image.shape[:2]
        rgb, gray = self._small(image)
        size = gray.shape[::-1]
        if target.clicks:
            full = self._clicks.decode(image, None, target.prompt, None)[0].mask
            small = self._resize_mask(full, size)
        elif target.box is not None:
            small = self._box_grabcut(rgb, target, (width, height))
            full = self._resize_mask(small, (width, height))
        else:
            full = target.shape_mask(width, height)
            small = self._resize_mask(full, size)
        area = float(small.sum())
        state = FlowState(gray, small, area, lost=area == 0)
        return Tracked(full, 1.0 if area else 0.0), state

    def step(self, image: np.ndarray, state: FlowState) -> tuple[Tracked, FlowState]:
        height, width = image.shape[:2]
        rgb, gray = self._small(image)
        if state.lost or gray.shape != state.gray.shape or not state.mask.any():
            empty = np.zeros((height, width), bool)
            return Tracked(empty, 0.0, lost=True), FlowState(
                gray, state.mask, state.start_area, True
            )
        flow = self._flow.calc(gray, state.gray, None)  # new frame -> previous frame
        h, w = gray.shape
        grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        warped = cv2.remap(
            state.mask.astype(np.float32),
            grid_x + flow[..., 0],
            grid_y + flow[..., 1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        moved = warped >= 0.5
        refined = self._band_grabcut(rgb, moved)
        area = float(refined.sum())
        previous = float(state.mask.sum())
        lost = (
            area < self.lost_fraction * state.start_area
            or area < self.collapse_fraction * previous
            or area < 4
        )
        union = np.logical_or(moved, refined).sum()
        score = float(np.logical_and(moved, refined).sum() / union) if union else 0.0
        full = self._resize_mask(refined, (width, height))
        return Tracked(full, score, lost=lost), FlowState(gray, refined, state.start_area, lost)

    # -- GrabCut -------------------------------------------------------------------------------
    def _box_grabcut(
        self, rgb: np.ndarray, target: TrackTarget, frame: tuple[int, int]
    ) -> np.ndarray:
        h, w = rgb.shape[:2]
        sx, sy = w / frame[0], h / frame[1]
        box = target.box
        assert box is not None
        x1, y1 = int(box.x1 * sx), int(box.y1 * sy)
        x2, y2 = min(w - 1, int(np.ceil(box.x2 * sx))), min(h - 1, int(np.ceil(box.y2 * sy)))
        rect_mask = np.zeros((h, w), bool)
        rect_mask[y1 : y2 + 1, x1 : x2 + 1] = True
        if x2 - x1 < 4 or y2 - y1 < 4:
            return rect_mask
        labels = np.zeros((h, w), np.uint8)  # GC_BGD outside
        labels[rect_mask] = cv2.GC_PR_FGD
        return self._grabcut(rgb, labels, fallback=rect_mask, iterations=self.iterations + 2)

    def _band_grabcut(self, rgb: np.ndarray, moved: np.ndarray) -> np.ndarray:
        if not moved.any():
            return moved
        h, w = moved.shape
        radius = max(2, round(self.band * max(h, w)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        as_u8 = moved.astype(np.uint8)
        inner = cv2.erode(as_u8, kernel).astype(bool)
        outer = cv2.dilate(as_u8, kernel).astype(bool)
        labels = np.full((h, w), cv2.GC_BGD, np.uint8)
        labels[outer] = cv2.GC_PR_BGD
        labels[moved] = cv2.GC_PR_FGD
        labels[inner] = cv2.GC_FGD
        return self._grabcut(rgb, labels, fallback=moved, iterations=self.iterations)

    @staticmethod
    def _grabcut(
        rgb: np.ndarray, labels: np.ndarray, *, fallback: np.ndarray, iterations: int
    ) -> np.ndarray:
        """GrabCut on the crop around the undecided labels (pinned RNG: repeatable answers)."""
        undecided = (labels == cv2.GC_PR_FGD) | (labels == cv2.GC_PR_BGD)
        fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        if not undecided.any() or not fg.any():
            return fallback
        ys, xs = np.nonzero(undecided | fg)
        h, w = labels.shape
        pad = 8
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
        crop = labels[y0:y1, x0:x1].copy()
        if not ((crop == cv2.GC_BGD) | (crop == cv2.GC_PR_BGD)).any():
            return fallback
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(
                np.ascontiguousarray(rgb[y0:y1, x0:x1, ::-1]),
                crop,
                None,
                bgd,
                fgd,
                iterations,
                cv2.GC_INIT_WITH_MASK,
            )
        except cv2.error:  # degenerate colour models (a flat crop): keep the unrefined mask
            return fallback
        out = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = (crop == cv2.GC_FGD) | (crop == cv2.GC_PR_FGD)
        return out

    # -- SharesTrackState ------------------------------------------------------------------------
    def state_to_bytes(self, state: FlowState) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            gray=state.gray,
            mask=np.packbits(state.mask),
            meta=np.array([state.start_area, float(state.lost)], np.float64),
        )
        return buffer.getvalue()

    def state_from_bytes(self, data: bytes) -> FlowState:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            gray, packed, meta = archive["gray"], archive["mask"], archive["meta"]
        if gray.dtype != np.uint8 or gray.ndim != 2 or meta.shape != (2,):
            raise ValueError("not a flow tracker state")
        mask = np.unpackbits(packed, count=gray.size).reshape(gray.shape).astype(bool)
        return FlowState(gray, mask, float(meta[0]), bool(meta[1]))


def build(
    name: str = "flow", device: str | None = None, checkpoint: str | None = None, **options: Any
) -> FlowTracker:
    """Registry factory: CPU only and weights-free (``device`` accepted and ignored)."""
    if checkpoint:
        raise ModelLoadError("the flow tracker has no weights; it takes no checkpoint")
    return FlowTracker(name, **options)
