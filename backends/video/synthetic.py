"""Synthetic video clips with per-frame ground truth, built from GrabCut-benchmark images.

Objects are cut out of benchmark images with their ground-truth masks and composited over a
background (another benchmark image, slowly panning); each object moves along a smooth path,
grows and shrinks, and passes partly behind an occluding bar and behind the objects drawn after
it. The ground truth of an object on a frame is its *visible* pixels. Frames are rendered on
demand (``clip.frame(i)``), so a 1,000-frame 1080p clip costs one frame of memory: the tests use
it at small sizes, the benchmarks at 1080p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from backends import images
from backends.evaluation.datasets import load_samples


@dataclass(frozen=True, eq=False)
class Sprite:
    rgb: np.ndarray  # cut-out, cropped to the object
    alpha: np.ndarray  # bool, same size: the object's ground-truth pixels


@dataclass(frozen=True)
class Path2D:
    """Where one object is at time t ∈ [0, 1]: centre (fractions of the frame) and scale."""

    x0: float
    y0: float
    dx: float
    dy: float
    wobble: float
    phase: float
    scale: float
    zoom: float

    def at(self, t: float) -> tuple[float, float, float]:
        x = self.x0 + self.dx * t + self.wobble * math.sin(2 * math.pi * t + self.phase)
        y = self.y0 + self.dy * t + self.wobble * math.cos(2 * math.pi * t + self.phase)
        scale = self.scale * (1.0 + self.zoom * math.sin(math.pi * t))
        return x, y, scale


@dataclass
class SyntheticClip:
    """``frames`` frames of ``width``×``height``; ``frame(i)`` → (RGB frame, visible masks)."""

    width: int
    height: int
    frames: int
    background: np.ndarray
    sprites: list[Sprite]
    paths: list[Path2D]
    occluder: bool = True
    _cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.frames

    def frame(self, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        t = index / max(1, self.frames - 1)
        pan = int(0.05 * self.width * t)
        frame = np.ascontiguousarray(np.roll(self.background, -pan, axis=1))
        masks: list[np.ndarray] = []
        for sprite, path in zip(self.sprites, self.paths, strict=True):
            x, y, scale = path.at(t)
            full = self._paste(frame, sprite, x * self.width, y * self.height, scale)
            for earlier in masks:  # this object is drawn over the earlier ones
                earlier &= ~full
            masks.append(full)
        if self.occluder:
            bar = self._occluder(t)
            frame[bar] = (90, 90, 90)
            for mask in masks:
                mask &= ~bar
        return frame, masks

    def encoded(self, index: int, quality: int = 90) -> bytes:
        """Frame ``index`` as JPEG file bytes (what a tool sends)."""
        frame, _ = self.frame(index)
        ok, data = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return data.tobytes()

    def _occluder(self, t: float) -> np.ndarray:
        """A vertical bar a twelfth of the frame wide, sweeping left to right."""
        bar = np.zeros((self.height, self.width), bool)
        width = max(2, self.width // 12)
        x = int((0.15 + 0.7 * t) * self.width)
        bar[int(0.55 * self.height) :, x : x + width] = True
        return bar

    def _paste(
        self, frame: np.ndarray, sprite: Sprite, cx: float, cy: float, scale: float
    ) -> np.ndarray:
        h, w = sprite.alpha.shape
        size = (max(2, round(w * scale)), max(2, round(h * scale)))
        rgb = cv2.resize(sprite.rgb, size, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(sprite.alpha.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        x0, y0 = round(cx - size[0] / 2), round(cy - size[1] / 2)
        fx0, fy0 = max(0, x0), max(0, y0)
        fx1, fy1 = min(self.width, x0 + size[0]), min(self.height, y0 + size[1])
        mask = np.zeros((self.height, self.width), bool)
        if fx0 >= fx1 or fy0 >= fy1:
            return mask
        crop = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
        visible = alpha[crop].astype(bool)
        region = frame[fy0:fy1, fx0:fx1]
        region[visible] = rgb[crop][visible]
        mask[fy0:fy1, fx0:fx1] = visible
        return mask


def _sprite(image: np.ndarray, gt: np.ndarray) -> Sprite:
    obj = gt == 1
    ys, xs = np.nonzero(obj)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return Sprite(np.ascontiguousarray(image[box]), obj[box].copy())


def build_clip(
    dataset: str | Path,
    *,
    objects: int = 2,
    frames: int = 60,
    width: int = 640,
    height: int = 360,
    seed: int = 0,
    occluder: bool = True,
) -> SyntheticClip:
    """A clip of ``objects`` GrabCut objects over a GrabCut background (deterministic in
    ``seed``). Objects are scaled to about a third of the frame height and move about a third
    of the frame width over the clip, so consecutive frames differ as in real footage at
    ``frames`` frames for a few seconds of motion."""
    samples = list(load_samples(dataset))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    background_sample = samples[int(order[0])]
    background = images.decode(background_sample.image_bytes)
    background = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
    background = cv2.GaussianBlur(background, (0, 0), 2.0)
    sprites, paths = [], []
    for k in range(objects):
        sample = samples[int(order[1 + k])]
        sprite = _sprite(images.decode(sample.image_bytes), sample.gt)
        target = 0.35 * height / max(sprite.alpha.shape)
        sprites.append(sprite)
        x0 = (k + 0.6) / (objects + 0.4)
        paths.append(
            Path2D(
                x0=float(x0 - 0.1),
                y0=float(rng.uniform(0.35, 0.6)),
                dx=float(rng.uniform(0.15, 0.3)) * (1 if k % 2 == 0 else -1),
                dy=float(rng.uniform(-0.1, 0.1)),
                wobble=0.03,
                phase=float(rng.uniform(0, 2 * math.pi)),
                scale=float(target),
                zoom=0.25,
            )
        )
    return SyntheticClip(width, height, frames, background, sprites, paths, occluder)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
