"""Refine what a task already holds: the region a click lands on becomes the model's
previous mask (``Prompt.previous_mask``) instead of the click starting a new object.

Label Studio 1.23.2 sends the task along with every interactive click, serialised by
``data_export.serializers.BaseExportDataSerializerForInteractive`` with ``expand=['drafts',
'predictions', 'annotations']`` (``ml/models.py: MLBackend.interactive_annotating``): every
annotation and prediction of the task, and the drafts of the annotator who clicks
(``ml/mixins.py: InteractiveMixin``), each with its ``result`` list of regions.

The region to refine (``region_to_refine``) is a brush region (``type: brushlabels``,
``value.format: rle``) or a polygon (``polygonlabels``) on the clicked image whose control and
label are among the outputs the click answers in (``LabelConfig.outputs_for``), and which the
object's *first* click lands inside or within ``distance`` of (a fraction of the image's longer
side, ``TAPMASK_REFINE_DISTANCE``). The first click, so every later click of the same object
refines the same region. Several candidates: the one nearest to the first click (0 inside), then
the annotator's drafts before annotations before predictions, then the order Label Studio lists
them in. Regions this backend answered to the earlier clicks of the same object (their ids, when
Label Studio keeps them) are never a starting point. At most ``TAPMASK_MAX_REFINE_REGIONS`` regions
are decoded; a region that cannot be decoded or belongs to another picture is skipped (logged),
never an error: the click then starts from scratch as it would without the region.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from backends import masks
from backends.errors import InvalidRequest, TapmaskError
from backends.labelstudio.frames import frame_for
from backends.labelstudio.labelconfig import OUTPUT_TYPES, Control
from backends.prompts import Click, finite_number
from backends.settings import MAX_REFINE_REGIONS

log = logging.getLogger("tapmask.labelstudio")

#: Where a task keeps regions, in the order a tie is broken (the clicking annotator's own draft
#: is what they see now; predictions are the oldest).
SOURCES = ("drafts", "annotations", "predictions")


@dataclass(frozen=True)
class ImageGeometry:
    """The decoded image a click is on: its size and EXIF orientation (``images.header``)."""

    height: int
    width: int
    orientation: int = 1


@dataclass
class Existing:
    """A region found in the task, as a decoded-image mask."""

    source: str  # e.g. "predictions[0]"
    region_id: Any
    mask: np.ndarray
    distance: float  # from the first click, in decoded-image pixels (0 inside)


def _regions(
    task: dict[str, Any], to_name: str, outputs: Collection[tuple[Control, str]]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(source, rank, region)`` for every brush (RLE) or polygon region of the outputs'
    controls and labels."""
    wanted = {(control.name, label) for control, label in outputs}
    for rank, key in enumerate(SOURCES):
        items = task.get(key)
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            result = item.get("result") if isinstance(item, dict) else None
            if not isinstance(result, list):
                continue
            for region in result:
                kind = region.get("type") if isinstance(region, dict) else None
                if kind not in OUTPUT_TYPES or region.get("to_name") != to_name:
                    continue
                value = region.get("value")
                labels = value.get(kind) if isinstance(value, dict) else None
                if not isinstance(labels, list) or not any(
                    (region.get("from_name"), label) in wanted for label in labels
                ):
                    continue
                if kind == "polygonlabels" or value.get("format") == "rle":
                    yield f"{key}[{index}]", rank, region


def _declared_mask(region: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The region's mask in its own declared frame: brush RLE decoded, polygon filled (its
    percent points are pixel edges, as ``predict.regions`` writes them)."""
    value = region["value"]
    if region["type"] == "brushlabels":
        if not isinstance(value.get("rle"), list):
            raise ValueError("brush rle must be a list of integers")
        return masks.ls_rle_to_mask(value["rle"], height, width)
    points = np.asarray(value.get("points"), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError("polygon points must be 3 or more [x%, y%] pairs")
    if not np.isfinite(points).all():
        raise ValueError("polygon points must be finite")
    pixels = points / 100.0 * [width, height] - 0.5  # edges → pixel centres
    return masks.polygons_to_mask([pixels], height, width)


def _decode(region: dict[str, Any], image: ImageGeometry) -> np.ndarray:
    """The region's mask on the decoded image (``ValueError``/``TapmaskError`` if unusable)."""
    width = round(finite_number(region.get("original_width"), "original_width", InvalidRequest))
    height = round(finite_number(region.get("original_height"), "original_height", InvalidRequest))
    if width < 1 or height < 1:
        raise ValueError("original_width/original_height must be positive")
    frame = frame_for(width, height, image.height, image.width, image.orientation)
    return frame.to_image(_declared_mask(region, height, width))


def _distance(mask: np.ndarray, click: Click, limit: float) -> float:
    """Pixels from the click to the mask (0 inside; ``inf`` beyond ``limit``)."""
    height, width = mask.shape
    row = min(max(round(click.y), 0), height - 1)
    col = min(max(round(click.x), 0), width - 1)
    if mask[row, col]:
        return 0.0
    reach = int(np.ceil(limit)) + 1
    top, left = max(0, row - reach), max(0, col - reach)
    window = mask[top : row + reach + 1, left : col + reach + 1]
    if not window.any():
        return float("inf")
    # Distance of every pixel to the nearest mask pixel (the zeros of the inverted window).
    outside = (~window).astype(np.uint8)
    distance = float(
        cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[row - top, col - left]
    )
    return distance if distance <= limit else float("inf")


def region_to_refine(
    task: dict[str, Any],
    to_name: str,
    outputs: Collection[tuple[Control, str]],
    first_click: Click,
    image: ImageGeometry,
    distance: float,
    skip_ids: Collection[Any] = (),
) -> Existing | None:
    """The existing region the object's first click refines, or None (module docstring).

    ``distance``: how far outside a region the first click may land, as a fraction of the
    image's longer side. ``skip_ids``: region ids never to start from (this backend's answers to
    the object's earlier clicks).
    """
    limit = distance * max(image.height, image.width)
    max_regions = int(MAX_REFINE_REGIONS)
    best: tuple[float, int, int] | None = None
    chosen: Existing | None = None
    decoded = 0
    for order, (source, rank, region) in enumerate(_regions(task, to_name, outputs)):
        if region.get("id") is not None and region.get("id") in skip_ids:
            continue
        if decoded == max_regions:
            log.info(
                "task %s: more than %d regions of this label; the rest are not considered "
                "for refinement (TAPMASK_MAX_REFINE_REGIONS)",
                task.get("id"),
                max_regions,
            )
            break
        decoded += 1
        try:
            mask = _decode(region, image)
        except (ValueError, TypeError, TapmaskError) as exc:
            log.info(
                "task %s: %s region %s not refined: %s",
                task.get("id"),
                source,
                region.get("id"),
                exc,
            )
            continue
        gap = _distance(mask, first_click, limit)
        if not np.isfinite(gap):
            continue
        key = (gap, rank, order)
        if best is None or key < best:
            best, chosen = key, Existing(source, region.get("id"), mask, gap)
    return chosen
