"""RITM's ``NoBRS`` predictor (``BasePredictor`` + ``ZoomIn`` + ``SigmoidForPred`` + flip), made
functional: everything the official predictor object carries from click to click is in
:class:`PredictorState`, so one step can run for any click of any interaction.

One step, for all clicks so far (official order):

1. input = RGB (``uint8 / 255``) + the previous full-image probability map (zeros at first);
2. zoom-in (not for the first click): candidate ROI = bbox of (previous probabilities > 0.5) ∪
   positive click pixels, expanded ×1.4, at least 200 px, clamped; it replaces the held ROI
   when none is held, a positive click lies outside the held ROI (on its last row/column
   counts as outside) or the ROIs' IoU is < 0.5. The held ROI is cropped and resized so its
   longer side is 400 (small ROIs are enlarged), clicks are mapped into the crop (float64).
   When no previous pixel is > 0.5 the network sees the full image, **but a held ROI stays set
   and the inverse step still resizes the full-image output into it** (official behaviour);
3. optional longest-side limit (ours, off by default; see :class:`RitmPredictor`);
4. batch ``[x, flip(x)]``, flipped clicks ``x' = W - 1 - x``; logits averaged
   ``0.5 * (l0 + flip(l1))``; sigmoid;
5. probabilities resized into the ROI (bilinear, ``align_corners=True``) and pasted into zeros.

The returned map is the next step's previous mask; the mask is ``probs > prob_thresh`` (0.49),
while the zoom-in uses its own 0.5.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from backends.models.ritm.model import HRNetModel

Roi = tuple[int, int, int, int]  # (rmin, rmax, cmin, cmax), inclusive


class NetClick(NamedTuple):
    """A click in the official convention: integer pixel row ``y`` and column ``x``."""

    y: int
    x: int
    positive: bool


class _NetRow(NamedTuple):
    y: float
    x: float
    positive: bool
    index: int


@dataclass(frozen=True)
class ZoomParams:
    """Official ``ZoomIn`` parameters (``evaluate_model.py`` cvpr mode uses target_size=400)."""

    target_size: int = 400
    """Longer side of the zoomed crop the network sees (small ROIs are enlarged to it)."""
    skip_clicks: int = 1
    """Clicks that see the full image before zooming in starts."""
    expansion_ratio: float = 1.4
    """Growth of the object's bounding box (and the clicks) into the ROI."""
    min_crop_size: int = 200
    """Smallest ROI side, in image pixels."""
    recompute_thresh_iou: float = 0.5
    """A held ROI is replaced when its IoU with the new candidate falls below this."""
    prob_thresh: float = 0.5
    """Previous-probability threshold that defines the object for the ROI."""


@dataclass
class PredictorState:
    """What the official predictor holds between clicks of one object.

    ``probs``: the full-image probability map returned by the last step (float32 H×W; the
    official ``prev_prediction`` and ``ZoomIn._prev_probs``, which are the same map).
    ``roi``: the zoom-in ROI held by ``ZoomIn._object_roi``, or None.
    """

    probs: np.ndarray
    roi: Roi | None
    num_clicks: int

    @property
    def nbytes(self) -> int:
        return int(self.probs.nbytes)


@dataclass
class StepInfo:
    """Diagnostics of one step (what the reference records describe)."""

    roi: Roi | None  # ROI held after the step
    candidate_roi: Roi | None  # ROI computed at this step, before keep/replace; None if not
    zoom_applied: bool  # the network saw the ROI crop
    roi_changed: bool
    net_input_hw: tuple[int, int]
    points: torch.Tensor = field(repr=False)  # the points tensor given to the network


@dataclass
class StepResult:
    probs: np.ndarray  # float32 H×W
    state: PredictorState
    info: StepInfo


# --- zoom-in geometry (official isegm.utils.misc / transforms.zoom_in) -----------------------


def _bbox_from_mask(mask: np.ndarray) -> Roi:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _expand_bbox(bbox: Roi, ratio: float, min_size: float) -> Roi:
    rmin, rmax, cmin, cmax = bbox
    rcenter = 0.5 * (rmin + rmax)
    ccenter = 0.5 * (cmin + cmax)
    height = max(ratio * (rmax - rmin + 1), min_size)
    width = max(ratio * (cmax - cmin + 1), min_size)
    # Python round(): half to even, as in the official code.
    return (
        round(rcenter - 0.5 * height),
        round(rcenter + 0.5 * height),
        round(ccenter - 0.5 * width),
        round(ccenter + 0.5 * width),
    )


def object_roi(mask: np.ndarray, clicks: Sequence[NetClick], ratio: float, min_size: float) -> Roi:
    """Official ``get_object_roi``: bbox of ``mask`` ∪ positive click pixels, expanded, clamped."""
    mask = mask.copy()
    for click in clicks:
        if click.positive:
            mask[click.y, click.x] = True
    rmin, rmax, cmin, cmax = _expand_bbox(_bbox_from_mask(mask), ratio, min_size)
    h, w = mask.shape
    return max(0, rmin), min(h - 1, rmax), max(0, cmin), min(w - 1, cmax)


def _segment_iou(a: int, b: int, c: int, d: int) -> float:
    intersection = max(0, min(b, d) - max(a, c) + 1)
    union = max(1e-6, max(b, d) - min(a, c) + 1)
    return intersection / union


def roi_iou(r1: Roi, r2: Roi) -> float:
    """Official ``get_bbox_iou``: the product of the row and column segment IoUs."""
    return _segment_iou(r1[0], r1[1], r2[0], r2[1]) * _segment_iou(r1[2], r1[3], r2[2], r2[3])


def clicks_inside(roi: Roi, clicks: Sequence[NetClick]) -> bool:
    """Official ``check_object_roi``: half-open test, so the last ROI row/column is outside."""
    for click in clicks:
        if click.positive and not (roi[0] <= click.y < roi[1] and roi[2] <= click.x < roi[3]):
            return False
    return True


def resized_roi_hw(roi_h: int, roi_w: int, target: int) -> tuple[int, int]:
    scale = target / max(roi_h, roi_w)
    return round(roi_h * scale), round(roi_w * scale)


# --- the predictor ---------------------------------------------------------------------------


def _image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float32 ``/ 255`` (torchvision ``ToTensor``)."""
    with warnings.catch_warnings():
        # Cached images are read-only; the uint8 tensor is only read (converted to a new one).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return tensor.permute(2, 0, 1).unsqueeze(0).float().div(255)


class RitmPredictor:
    """The official NoBRS predictor for one network; stateless, see :class:`PredictorState`.

    ``max_size`` (ours, None by default): when the network input (after zoom-in) has a side
    longer than ``max_size`` it is resized so the longer side is ``max_size`` and the output
    resized back; this bounds the cost of first clicks on big frames. It is computed afresh at
    every step (the official ``LimitLongestSide`` transform can keep a stale full-image ROI from
    an earlier click; we do not reproduce that). Off in the equivalence tests.
    """

    def __init__(
        self,
        net: HRNetModel,
        device: torch.device | str = "cpu",
        *,
        prob_thresh: float = 0.49,
        with_flip: bool = True,
        zoom_in: ZoomParams | None = None,
        max_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.prob_thresh = prob_thresh
        self.with_flip = with_flip
        self.zoom = zoom_in if zoom_in is not None else ZoomParams()
        self.max_size = max_size

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """Inference mode, and on CUDA plain float32 convolutions (no TF32)."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                cudnn = torch.backends.cudnn
                with cudnn.flags(
                    enabled=cudnn.enabled,
                    benchmark=cudnn.benchmark,
                    deterministic=cudnn.deterministic,
                    allow_tf32=False,
                ):
                    yield
            else:
                yield

    def points_tensor(self, batch: list[list[_NetRow]], is_float: bool) -> torch.Tensor:
        """Official ``get_points_nd``: B×2N×3 rows ``(y, x, click_index)``, the positive clicks
        then the negative ones, each group padded to N with ``(-1, -1, -1)``; int64 for integer
        pixel coordinates, float64 once a transform has made them fractional."""
        groups = [
            ([r for r in rows if r.positive], [r for r in rows if not r.positive]) for rows in batch
        ]
        n = max(1, *(max(len(pos), len(neg)) for pos, neg in groups))
        pad = [(-1, -1, -1)]
        data = [
            [(r.y, r.x, r.index) for r in pos]
            + pad * (n - len(pos))
            + [(r.y, r.x, r.index) for r in neg]
            + pad * (n - len(neg))
            for pos, neg in groups
        ]
        dtype = torch.float64 if is_float else torch.int64
        return torch.tensor(data, dtype=dtype, device=self.device)

    def step(
        self,
        image: np.ndarray,
        clicks: Sequence[NetClick],
        state: PredictorState | None,
        prev_mask: np.ndarray | None = None,
    ) -> StepResult:
        """One official ``get_prediction(clicker, prev_mask)`` call for ``clicks`` (all clicks
        so far, in order), continuing from ``state`` (None: a fresh predictor).

        ``prev_mask`` (H×W, values in [0, 1]) replaces the previous probabilities as the
        network's previous-mask input for this call only, as in the official code; the zoom-in
        still works from ``state``.
        """
        if not clicks:
            raise ValueError("RITM needs at least one click")
        height, width = image.shape[:2]
        for click in clicks:
            if not (0 <= click.y < height and 0 <= click.x < width):
                raise ValueError(f"click {click} outside the {height}×{width} image")
        if prev_mask is not None:
            prev_mask = np.ascontiguousarray(prev_mask, dtype=np.float32)
            if prev_mask.shape != (height, width):
                raise ValueError(f"prev_mask {prev_mask.shape} does not match {height}×{width}")
        with self._numerics():
            return self._step(image, list(clicks), state, prev_mask)

    def _step(
        self,
        image: np.ndarray,
        clicks: list[NetClick],
        state: PredictorState | None,
        prev_mask: np.ndarray | None,
    ) -> StepResult:
        height, width = image.shape[:2]
        zoom = self.zoom
        prev_probs = state.probs if state is not None else None
        roi = state.roi if state is not None else None
        net_prev = prev_mask if prev_mask is not None else prev_probs

        # -- zoom-in transform: decide the ROI and whether this click sees the crop
        candidate: Roi | None = None
        crop = False
        roi_changed = False
        if len(clicks) > zoom.skip_clicks and prev_probs is not None:
            above = prev_probs > zoom.prob_thresh
            if above.any():
                candidate = object_roi(above, clicks, zoom.expansion_ratio, zoom.min_crop_size)
            if candidate is not None:
                if (
                    roi is None
                    or not clicks_inside(roi, clicks)
                    or roi_iou(candidate, roi) < zoom.recompute_thresh_iou
                ):
                    roi = candidate
                    roi_changed = True
                crop = True

        # -- network input (crop the uint8 image before converting: same values, less work)
        prev = (
            torch.from_numpy(net_prev).to(self.device)[None, None]
            if net_prev is not None
            else torch.zeros((1, 1, height, width), dtype=torch.float32, device=self.device)
        )
        # (y, x) in network-input pixels; Python ints until a transform makes them floats.
        coords: list[tuple[float, float]] = [(c.y, c.x) for c in clicks]
        is_float = False
        if crop:
            assert roi is not None
            rmin, rmax, cmin, cmax = roi
            rgb = _image_tensor(image[rmin : rmax + 1, cmin : cmax + 1], self.device)
            x = rgb
            if self.net.with_prev_mask:
                x = torch.cat((rgb, prev[:, :, rmin : rmax + 1, cmin : cmax + 1]), dim=1)
            crop_h, crop_w = resized_roi_hw(rmax - rmin + 1, cmax - cmin + 1, zoom.target_size)
            x = F.interpolate(x, size=(crop_h, crop_w), mode="bilinear", align_corners=True)
            # Official _transform_clicks: integer products, one float64 division.
            coords = [
                (crop_h * (y - rmin) / (rmax - rmin + 1), crop_w * (x_ - cmin) / (cmax - cmin + 1))
                for y, x_ in coords
            ]
            is_float = True
        else:
            x = _image_tensor(image, self.device)
            if self.net.with_prev_mask:
                x = torch.cat((x, prev), dim=1)

        limited_from: tuple[int, int] | None = None
        if self.max_size is not None and max(x.shape[2:]) > self.max_size:
            h0, w0 = x.shape[2], x.shape[3]
            new_h, new_w = resized_roi_hw(h0, w0, self.max_size)
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
            coords = [(new_h * y / h0, new_w * x_ / w0) for y, x_ in coords]
            is_float = True
            limited_from = (h0, w0)

        net_h, net_w = x.shape[2], x.shape[3]
        batch = [
            [
                _NetRow(y, x_, c.positive, i)
                for i, ((y, x_), c) in enumerate(zip(coords, clicks, strict=True))
            ]
        ]
        if self.with_flip:  # official AddHorizontalFlip: x' = W - x - 1, in this order
            x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
            batch.append([r._replace(x=net_w - r.x - 1) for r in batch[0]])
        points = self.points_tensor(batch, is_float)

        logits = self.net(x, points, aux=False)["instances"]
        logits = F.interpolate(logits, size=(net_h, net_w), mode="bilinear", align_corners=True)
        if self.with_flip:
            logits = 0.5 * (logits[:1] + torch.flip(logits[1:], dims=[3]))
        probs_t = torch.sigmoid(logits)

        if limited_from is not None:
            probs_t = F.interpolate(probs_t, size=limited_from, mode="bilinear", align_corners=True)
        if roi is not None:  # also when this click was not cropped: the stale-ROI behaviour
            rmin, rmax, cmin, cmax = roi
            probs_t = F.interpolate(
                probs_t,
                size=(rmax - rmin + 1, cmax - cmin + 1),
                mode="bilinear",
                align_corners=True,
            )
            if prev_probs is not None:
                full = torch.zeros((1, 1, height, width), dtype=probs_t.dtype, device=self.device)
                full[:, :, rmin : rmax + 1, cmin : cmax + 1] = probs_t
                probs_t = full
        probs = probs_t[0, 0].float().cpu().numpy()

        info = StepInfo(
            roi=roi,
            candidate_roi=candidate,
            zoom_applied=crop,
            roi_changed=roi_changed,
            net_input_hw=(net_h, net_w),
            points=points.cpu(),
        )
        return StepResult(probs, PredictorState(probs, roi, len(clicks)), info)

    def predict(self, image: np.ndarray, clicks: Sequence[NetClick]) -> StepResult:
        """Replay a whole interaction: one step per click prefix, as the official loop does."""
        state = None
        result = None
        for n in range(1, len(clicks) + 1):
            result = self.step(image, clicks[:n], state)
            state = result.state
        assert result is not None
        return result
