"""Mask codecs: polygons, COCO RLE, Label Studio brush RLE and CVAT mask formats.

Every function takes a 2-D mask, ``bool`` or any numeric dtype where nonzero means foreground
(so 0/1 and 0/255 ``uint8`` masks both work), and rejects anything that is not 2-D with
``ValueError``. Decoders return ``bool`` arrays of shape (height, width).

Coordinates follow the rest of tapmask: x is the column, y the row, and pixel centres sit at
integer coordinates, so a polygon vertex (3, 5) is the centre of ``mask[5, 3]``.

This module deliberately imports nothing from ``backends`` so workers can use it stand-alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray
from pycocotools import mask as coco_mask

__all__ = [
    "Polygon",
    "coco_rle_to_mask",
    "cvat_crop_to_mask",
    "cvat_rle_to_mask",
    "largest_polygon",
    "ls_rle_decode_values",
    "ls_rle_encode_values",
    "ls_rle_to_mask",
    "mask_bbox",
    "mask_to_coco_rle",
    "mask_to_cvat_crop_json",
    "mask_to_cvat_rle",
    "mask_to_ls_rle",
    "mask_to_polygons",
    "polygon_to_percent",
    "polygons_to_mask",
]

BoolMask = NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _as_mask(mask: ArrayLike) -> BoolMask:
    """A 2-D boolean view/copy of ``mask`` (nonzero = foreground)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"mask must be boolean or numeric, got dtype {arr.dtype}")
    return arr != 0


def _check_size(height: int, width: int) -> tuple[int, int]:
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    return h, w


def mask_bbox(mask: ArrayLike) -> tuple[int, int, int, int] | None:
    """Tight bounding box ``(x1, y1, x2, y2)`` of the foreground, bounds inclusive.

    Returns ``None`` for a mask without foreground pixels.
    """
    m = _as_mask(mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    y1, y2 = int(rows[0]), int(rows[-1])
    # Only the rows that hold foreground need scanning for the column range.
    cols = np.flatnonzero(m[y1 : y2 + 1].any(axis=0))
    return int(cols[0]), y1, int(cols[-1]), y2


# --------------------------------------------------------------------------------------------
# Polygons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Polygon:
    """A closed polygon in pixel coordinates.

    ``points`` is an (N, 2) float array of (x, y) vertices, N >= 3, not repeating the first
    vertex at the end. ``is_hole`` marks the boundary of a hole in the preceding outer polygon.
    ``area`` is the area (px²) of the traced contour before simplification.
    """

    points: NDArray[np.float64]
    is_hole: bool = False
    area: float = 0.0

    def to_list(self) -> list[list[float]]:
        """``[[x, y], ...]`` as plain floats (JSON-ready)."""
        return self.points.tolist()


def mask_to_polygons(
    mask: ArrayLike,
    *,
    tolerance: float = 1.0,
    largest_only: bool = False,
    holes: bool = False,
    min_area: float = 1.0,
) -> list[Polygon]:
    """Outline the foreground as polygons (OpenCV contours).

    Args:
        tolerance: Douglas-Peucker simplification tolerance in pixels (``cv2.approxPolyDP``);
            0 keeps the exact traced outline.
        largest_only: keep only the outer polygon of largest area (with its holes if asked).
        holes: also report hole boundaries (``Polygon.is_hole``); otherwise holes are dropped
            and every outer polygon is filled solid.
        min_area: drop polygons whose traced contour encloses less than this many px². The
            default 1 drops the zero-area outlines of isolated pixels and 1-px-wide lines, which
            annotation tools cannot show as shapes.

    Polygons left with fewer than 3 vertices are dropped. Outer polygons come largest first,
    each directly followed by its holes, which is the order :func:`polygons_to_mask` expects.
    Vertices are pixel centres of boundary pixels, so a polygon lies half a pixel inside the
    object's outer pixel edges.
    """
    m = _as_mask(mask)
    bbox = mask_bbox(m)
    if bbox is None:
        return []
    x1, y1, x2, y2 = bbox
    # findContours scans the whole image; tracing only the foreground's bounding box is
    # equivalent (it treats outside the image as background) and much cheaper for small objects.
    # A bool array reinterpreted as uint8 is 0/1 without a copy; OpenCV copies only if the
    # layout needs it, and findContours no longer modifies its input.
    crop = m[y1 : y2 + 1, x1 : x2 + 1].view(np.uint8)
    mode = cv2.RETR_CCOMP if holes else cv2.RETR_EXTERNAL
    contours, hierarchy = cv2.findContours(crop, mode, cv2.CHAIN_APPROX_SIMPLE, offset=(x1, y1))
    if not contours:
        return []
    parents = hierarchy[0][:, 3]
    areas = [float(cv2.contourArea(c)) for c in contours]

    def simplified(index: int, is_hole: bool) -> Polygon | None:
        if areas[index] < min_area:
            return None
        contour = contours[index]
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, float(tolerance), True)
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:
            return None
        return Polygon(points=points, is_hole=is_hole, area=areas[index])

    # With RETR_CCOMP the hierarchy has two levels: outer boundaries (parent -1) and holes,
    # whose parent is the outer boundary around them. Islands inside holes are outer again.
    outers = sorted(
        (i for i in range(len(contours)) if parents[i] < 0), key=lambda i: (-areas[i], i)
    )
    holes_of: dict[int, list[int]] = {}
    if holes:
        for i, parent in enumerate(parents):
            if parent >= 0:
                holes_of.setdefault(int(parent), []).append(i)

    result: list[Polygon] = []
    for i in outers:
        outer = simplified(i, False)
        if outer is None:
            continue
        result.append(outer)
        for j in holes_of.get(i, []):
            hole = simplified(j, True)
            if hole is not None:
                result.append(hole)
        if largest_only:
            break
    return result


def largest_polygon(
    mask: ArrayLike, tolerance: float = 1.0, *, min_area: float = 1.0
) -> list[list[float]]:
    """Vertices ``[[x, y], ...]`` of the largest outer polygon; ``[]`` when there is none."""
    polygons = mask_to_polygons(mask, tolerance=tolerance, largest_only=True, min_area=min_area)
    return polygons[0].to_list() if polygons else []


def _int_points(points: ArrayLike) -> NDArray[np.int32]:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"polygon points must have shape (N, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("polygon points must be finite")
    return np.rint(pts).astype(np.int32)


def polygons_to_mask(polygons: Iterable[Polygon | ArrayLike], height: int, width: int) -> BoolMask:
    """Rasterise polygons back to a ``bool`` (height, width) mask.

    Items are :class:`Polygon` objects or plain (N, 2) point arrays (taken as outer polygons).
    A hole is cut from the outer polygon before it (the order :func:`mask_to_polygons` gives),
    so an island drawn later inside that hole is kept. Each polygon's outline is drawn as well
    as its interior, and a hole's outline stays foreground: both follow the pixel-centre
    convention of :func:`mask_to_polygons`, which makes ``tolerance=0`` round trips exact.
    """
    h, w = _check_size(height, width)
    out = np.zeros((h, w), dtype=np.uint8)

    groups: list[tuple[NDArray[np.int32] | None, list[NDArray[np.int32]]]] = []
    for item in polygons:
        if isinstance(item, Polygon):
            pts, is_hole = _int_points(item.points), item.is_hole
        else:
            pts, is_hole = _int_points(item), False
        if len(pts) == 0:
            continue
        if is_hole:
            if not groups:
                groups.append((None, []))
            groups[-1][1].append(pts)
        else:
            groups.append((pts, []))

    for outer, cut in groups:
        if outer is None:  # holes with no outer polygon before them: cut from what is drawn
            for pts in cut:
                cv2.fillPoly(out, [pts], 0)
                cv2.polylines(out, [pts], True, 1)
            continue
        if not cut:
            cv2.fillPoly(out, [outer], 1)
            cv2.polylines(out, [outer], True, 1)
            continue
        # Draw the outer polygon and its holes on a scratch canvas the size of the outer
        # polygon's box, so cutting the holes cannot erase other components.
        x0, y0 = outer.min(axis=0)
        x1, y1 = outer.max(axis=0) + 1
        offset = np.array([x0, y0], dtype=np.int32)
        tmp = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(tmp, [outer - offset], 1)
        cv2.polylines(tmp, [outer - offset], True, 1)
        for pts in cut:
            cv2.fillPoly(tmp, [pts - offset], 0)
            cv2.polylines(tmp, [pts - offset], True, 1)
        # Clip the scratch box to the image (polygons may reach outside it).
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, w), min(y1, h)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0:cy1, cx0:cx1] |= tmp[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return out.astype(bool)


def polygon_to_percent(points: Polygon | ArrayLike, width: int, height: int) -> list[list[float]]:
    """Pixel polygon → Label Studio ``[[x%, y%], ...]`` (percent of the natural image size).

    Plain scaling, ``x / width * 100``, the inverse of how Label Studio percent coordinates are
    turned into pixels elsewhere in tapmask.
    """
    h, w = _check_size(height, width)
    pts = np.asarray(points.points if isinstance(points, Polygon) else points, dtype=np.float64)
    if pts.size == 0:
        return []
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"polygon points must have shape (N, 2), got {pts.shape}")
    scaled = pts * np.array([100.0 / w, 100.0 / h])
    return scaled.tolist()


# --------------------------------------------------------------------------------------------
# COCO RLE
# --------------------------------------------------------------------------------------------


def mask_to_coco_rle(mask: ArrayLike) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [h, w], "counts": str}`` (JSON-safe)."""
    m = _as_mask(mask)
    rle = coco_mask.encode(np.asfortranarray(m, dtype=np.uint8))
    counts = rle["counts"]
    return {
        "size": [int(m.shape[0]), int(m.shape[1])],
        "counts": counts.decode("utf-8") if isinstance(counts, bytes) else str(counts),
    }


def coco_rle_to_mask(rle: Mapping[str, Any]) -> BoolMask:
    """Decode COCO RLE; ``counts`` may be a str, bytes, or an uncompressed list of ints."""
    try:
        size = rle["size"]
        counts = rle["counts"]
    except (KeyError, TypeError) as exc:
        raise ValueError("COCO RLE must be a mapping with 'size' and 'counts'") from exc
    if len(size) != 2:
        raise ValueError(f"COCO RLE size must be [height, width], got {size!r}")
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, str):
        obj = {"size": [h, w], "counts": counts.encode("utf-8")}
    elif isinstance(counts, bytes):
        obj = {"size": [h, w], "counts": counts}
    else:
        runs = [int(c) for c in counts]
        if sum(runs) != h * w:
            raise ValueError(f"COCO RLE counts sum to {sum(runs)}, expected {h}*{w}={h * w}")
        obj = coco_mask.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    # pycocotools decodes column-major; OpenCV refuses such an array as an output (GrabCut's
    # labels), so every mask leaves here row-major like the rest of the codecs' masks.
    return np.ascontiguousarray(coco_mask.decode(obj), dtype=bool)


# --------------------------------------------------------------------------------------------
# Label Studio brush RLE
# --------------------------------------------------------------------------------------------
#
# Bit stream (MSB first), as written by label_studio_sdk.converter.brush.encode_rle and read by
# the Label Studio front end (thi.ng rle-pack):
#   32 bits value count N | 5 bits word size - 1 | 4 x 4 bits run-field sizes - 1
#   chunks: 1 bit flag (1 repeat, 0 literal) | 2 bits size index k | sizes[k] bits count - 1 |
#           one word (repeat) or `count` words (literal)
#   zero padding: the SDK always appends 8 - (bits % 8) zeros, i.e. a whole zero byte when the
#   stream is already byte-aligned.
# The SDK encoder writes each run of equal values as: a literal chunk when the run has length 1,
# otherwise repeat chunks with the size index picked from the run length (<= 8, <= 16, <= 256,
# longer); runs over 65536 are cut into 65536-long chunks plus a remainder chunk, all with
# index 3, even when the remainder is short.

_LS_WORD_BITS = 8
_LS_SIZES = np.array([3, 4, 8, 16], dtype=np.int64)
_LS_SIZE_LIMITS = np.array([8, 16, 256], dtype=np.int64)  # longest run for indices 0, 1, 2
_LS_MAX_CHUNK = 1 << 16
_LS_HEADER_BITS = 32 + 5 + 4 * 4
_LS_HEADER = (
    ((_LS_WORD_BITS - 1) << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15
)  # everything after the 32-bit count: word size 8, sizes 3, 4, 8, 16


def _ls_encode_runs(lengths: NDArray[np.int64], values: NDArray[np.int64], num: int) -> bytes:
    """Pack runs (length, 8-bit value) into the SDK's bit stream, all in numpy."""
    if not 0 <= num < 1 << 32:
        raise ValueError(f"Label Studio RLE holds at most 2**32 - 1 values, got {num}")
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)

    # Cut runs longer than 256 into chunks of 65536 and a remainder (one chunk if it fits).
    n_chunks = np.where(lengths > 256, (lengths - 1) // _LS_MAX_CHUNK + 1, 1)
    if lengths.size and int(n_chunks.max()) > 1:
        run = np.repeat(np.arange(lengths.size), n_chunks)
        within = np.arange(run.size) - (np.cumsum(n_chunks) - n_chunks)[run]
        run_len = lengths[run]
        count = np.minimum(run_len - within * _LS_MAX_CHUNK, _LS_MAX_CHUNK)
        value = values[run]
    else:
        run_len = count = lengths
        value = values

    # The size index and the repeat flag follow the whole run's length, not the chunk's.
    size_idx = np.searchsorted(_LS_SIZE_LIMITS, run_len, side="left")
    width = _LS_SIZES[size_idx]
    flag = (run_len > 1).astype(np.int64)
    nbits = 3 + width + _LS_WORD_BITS
    code = (
        (flag << (2 + width + _LS_WORD_BITS))
        | (size_idx << (width + _LS_WORD_BITS))
        | ((count - 1) << _LS_WORD_BITS)
        | value
    )

    ends = _LS_HEADER_BITS + np.cumsum(nbits)
    start = ends - nbits
    total = int(ends[-1]) if ends.size else _LS_HEADER_BITS
    nbytes = total // 8 + 1  # 1 to 8 padding bits, as the SDK writes

    # Every chunk is at most 27 bits, so starting at bit (start % 8) of its first byte it spans
    # at most 5 bytes: left-align it in a 40-bit window and cut that into bytes. A chunk is at
    # least 14 bits long, so no two chunks start in the same byte and each of the five
    # scatters below writes distinct bytes; OR-ing merges chunks that share a byte.
    window = (code << (40 - (start & 7) - nbits)).astype(">u8").view(np.uint8).reshape(-1, 8)
    first = start >> 3
    out = np.zeros(nbytes + 5, dtype=np.uint8)
    for j in range(5):
        out[first + j] |= window[:, 3 + j]
    header = ((num << 21) | _LS_HEADER) << 3  # 53 bits, left-aligned in 7 bytes
    out[:7] |= np.frombuffer(header.to_bytes(7, "big"), dtype=np.uint8)
    return out[:nbytes].tobytes()


def _runs(flat: NDArray[Any]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Run lengths and run values of a 1-D array."""
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], starts, [flat.size]))
    return np.diff(bounds), flat[bounds[:-1]].astype(np.int64)


def ls_rle_encode_values(values: ArrayLike) -> list[int]:
    """``label_studio_sdk.converter.brush.encode_rle``: brush RLE of any 8-bit values (an RGBA
    image flattened, a label map); ``mask_to_ls_rle`` is the binary-mask case."""
    arr = np.asarray(values).ravel()
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("Label Studio RLE words are 8-bit: values must be in 0..255")
    lengths, run_values = _runs(arr)
    return list(_ls_encode_runs(lengths, run_values, arr.size))


def mask_to_ls_rle(mask: ArrayLike) -> list[int]:
    """Label Studio brush RLE (``"format": "rle"``), byte-identical to the SDK's ``mask2rle``.

    The mask is written as an RGBA image (255 in every channel for foreground, 0 elsewhere), as
    ``mask2rle`` does for a 0/255 ``uint8`` mask. Runs are found on the pixels directly: the
    four channels of a pixel are equal, so each RGBA run is four times a pixel run.
    """
    m = _as_mask(mask)
    flat = np.ascontiguousarray(m).reshape(-1).view(np.uint8)
    lengths, run_values = _runs(flat)
    return list(_ls_encode_runs(lengths * 4, run_values * 255, flat.size * 4))


def _bit_windows(data: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """``win[b]``: bytes b..b+7 as a big-endian 64-bit integer (zero-padded past the end)."""
    padded = np.zeros(data.size + 8, dtype=np.uint8)
    padded[: data.size] = data
    view = np.lib.stride_tricks.sliding_window_view(padded, 8)[: data.size + 1]
    return np.ascontiguousarray(view).view(">u8").reshape(-1).astype(np.uint64)


def _read_bits(win: NDArray[np.uint64], pos: NDArray[np.int64], k: ArrayLike) -> NDArray[np.int64]:
    """Unsigned ``k``-bit fields (k <= 56) starting at bit positions ``pos``, MSB first."""
    shifted = win[pos >> 3] << (pos & 7).astype(np.uint64)
    return (shifted >> (64 - np.asarray(k, dtype=np.int64)).astype(np.uint64)).astype(np.int64)


def _ls_decode_runs(
    rle: ArrayLike | bytes, expected: int | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Decode a brush RLE stream to runs ``(word values, repeat counts)`` summing to its count.

    Any word size and run-field sizes are read from the header, and literal chunks of several
    words (as the Label Studio front end writes them) are handled.
    """
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.size and not np.issubdtype(rle.dtype, np.integer)):
            raise ValueError("Label Studio RLE must be a flat list of byte values (ints)")
        if rle.size and (rle.min() < 0 or rle.max() > 255):
            raise ValueError("Label Studio RLE must hold byte values in 0..255")
        raw = rle.astype(np.uint8).tobytes()
    elif isinstance(rle, (int, str)):  # bytes(5) would be five zero bytes
        raise ValueError("Label Studio RLE must be a flat list of byte values in 0..255")
    else:
        try:
            raw = bytes(rle)  # also the fastest list[int] -> bytes, with range checking
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "Label Studio RLE must be a flat list of byte values in 0..255"
            ) from exc
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size * 8 < _LS_HEADER_BITS:
        raise ValueError(f"Label Studio RLE of {data.size} bytes is too short for its header")

    head = int.from_bytes(data[:7].tobytes(), "big") >> 3
    num = head >> 21
    word = ((head >> 16) & 0x1F) + 1
    sizes = np.array([((head >> (12 - 4 * i)) & 0xF) + 1 for i in range(4)], dtype=np.int64)
    if expected is not None and num != expected:
        raise ValueError(
            f"Label Studio RLE declares {num} values but the image needs {expected} "
            "(width * height * 4 RGBA values): wrong width/height for this RLE?"
        )
    if num == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)

    # Locating chunks is inherently sequential (each one's length depends on its own header),
    # so walk them in Python, one 64-bit window lookup and a few integer operations per chunk,
    # recording only where each chunk starts. Reading the fields and the words and expanding
    # the runs is then vectorised over all chunks at once.
    windows = _bit_windows(data)
    # Indexing a list is several times faster than a memoryview; past ~1 MiB of RLE (only
    # noise-like masks get there) the memoryview saves a list of a million big ints.
    win: Sequence[int] = windows.tolist() if windows.size <= 1 << 20 else memoryview(windows)
    nbits = data.size * 8
    size_list = [int(s) for s in sizes]
    starts: list[int] = []
    append = starts.append
    p, i = _LS_HEADER_BITS, 0
    while i < num:
        if p + 3 > nbits:
            raise ValueError(f"Label Studio RLE is truncated: it ends before its {num} values")
        x = win[p >> 3] << (p & 7)  # bit p is now bit 63
        width_k = size_list[(x >> 61) & 3]
        count_k = ((x >> (61 - width_k)) & ((1 << width_k) - 1)) + 1
        append(p)
        p += 3 + width_k + (word if (x >> 63) & 1 else count_k * word)
        i += count_k
    if p > nbits:
        raise ValueError(f"Label Studio RLE is truncated: it ends before its {num} values")

    pos = np.array(starts, dtype=np.int64)
    flag = _read_bits(windows, pos, 1) == 1
    width = sizes[_read_bits(windows, pos + 1, 2)]
    count = _read_bits(windows, pos + 3, width) + 1

    n_words = np.where(flag, 1, count)
    first_word = np.cumsum(n_words) - n_words
    word_index = np.arange(int(n_words.sum())) - np.repeat(first_word, n_words)
    word_pos = np.repeat(pos + 3 + width, n_words) + word_index * word
    words = _read_bits(windows, word_pos, word)
    repeats = np.repeat(np.where(flag, count, 1), n_words)
    # Like the SDK, drop whatever the last chunk holds beyond the declared count.
    ends = np.cumsum(repeats)
    keep = int(np.searchsorted(ends, num, side="left")) + 1
    words, repeats = words[:keep], repeats[:keep]
    repeats[-1] -= int(ends[keep - 1]) - num
    return words, repeats


def ls_rle_decode_values(rle: ArrayLike | bytes, expected: int | None = None) -> NDArray[np.uint32]:
    """The flat values of a brush RLE stream (what the SDK's ``decode_rle`` returns)."""
    words, repeats = _ls_decode_runs(rle, expected)
    return np.repeat(words.astype(np.uint32), repeats)


def ls_rle_to_mask(rle: Sequence[int] | bytes, height: int, width: int) -> BoolMask:
    """Decode Label Studio brush RLE to a ``bool`` (height, width) mask.

    Foreground is a nonzero alpha channel, as the SDK's exporter reads it.
    Raises ``ValueError`` when the declared value count is not ``width * height * 4``.
    """
    h, w = _check_size(height, width)
    words, repeats = _ls_decode_runs(rle, expected=h * w * 4)
    # Expand straight to pixels without materialising the RGBA array: a run covering values
    # [start, end) holds the alpha values 4q + 3 for q in [start // 4, end // 4).
    ends = np.cumsum(repeats)
    pixels = ends // 4 - (ends - repeats) // 4
    return np.repeat(words > 0, pixels).reshape(h, w)


# --------------------------------------------------------------------------------------------
# CVAT
# --------------------------------------------------------------------------------------------


def _require_bbox(m: BoolMask) -> tuple[int, int, int, int]:
    bbox = mask_bbox(m)
    if bbox is None:
        raise ValueError("empty mask: CVAT cannot store a mask without foreground pixels")
    return bbox


def _as_ints(values: Iterable[Any], what: str) -> NDArray[np.int64]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
        raise ValueError(f"{what} must be whole numbers")
    return arr.astype(np.int64)


def _check_bounds(bounds: NDArray[np.int64], height: int, width: int) -> None:
    x1, y1, x2, y2 = (int(v) for v in bounds)
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ValueError(
            f"CVAT bounds {[x1, y1, x2, y2]} do not fit a {width}x{height} image "
            "(expected 0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height)"
        )


def mask_to_cvat_rle(mask: ArrayLike) -> list[int]:
    """CVAT mask shape ``points``: ``[runs..., left, top, right, bottom]``.

    Runs cover the row-major crop of the inclusive bounding box, alternating background and
    foreground and always starting with background (a 0 run when the crop starts with
    foreground). Raises ``ValueError`` for an empty mask.
    """
    m = _as_mask(mask)
    x1, y1, x2, y2 = _require_bbox(m)
    flat = np.ascontiguousarray(m[y1 : y2 + 1, x1 : x2 + 1]).reshape(-1)
    lengths, values = _runs(flat)
    runs = lengths.tolist()
    if values[0]:
        runs.insert(0, 0)
    return [*runs, x1, y1, x2, y2]


def cvat_rle_to_mask(rle: Sequence[float], height: int, width: int) -> BoolMask:
    """Inverse of :func:`mask_to_cvat_rle` (accepts CVAT's float ``points`` as well)."""
    h, w = _check_size(height, width)
    values = _as_ints(rle, "CVAT RLE values")
    if values.size < 5:
        raise ValueError("CVAT RLE needs at least one run and the four bounds")
    runs, bounds = values[:-4], values[-4:]
    _check_bounds(bounds, h, w)
    x1, y1, x2, y2 = (int(v) for v in bounds)
    if (runs < 0).any():
        raise ValueError("CVAT RLE runs must not be negative")
    area = (y2 - y1 + 1) * (x2 - x1 + 1)
    if int(runs.sum()) != area:
        raise ValueError(
            f"CVAT RLE runs sum to {int(runs.sum())} but the bounds hold {area} pixels"
        )
    crop = np.repeat(np.arange(runs.size) % 2 == 1, runs).reshape(y2 - y1 + 1, x2 - x1 + 1)
    out = np.zeros((h, w), dtype=bool)
    out[y1 : y2 + 1, x1 : x2 + 1] = crop
    return out


def _crop_rows_json(crop: BoolMask) -> bytes:
    """``json.dumps(crop.astype(int).tolist())`` (compact, 0/1), vectorised: every pixel is two
    bytes (digit + separator), so a 6 MP crop takes tens of milliseconds instead of seconds."""
    height, width = crop.shape
    chars = np.empty((height, 2 * width + 2), np.uint8)  # "[d,d,…,d]," per row
    chars[:, 0] = ord("[")
    chars[:, 1 : 2 * width : 2] = np.where(crop, ord("1"), ord("0"))
    chars[:, 2 : 2 * width - 1 : 2] = ord(",")
    chars[:, 2 * width] = ord("]")
    chars[:, 2 * width + 1] = ord(",")
    return b"[" + chars.tobytes()[:-1] + b"]"


def mask_to_cvat_crop_json(mask: ArrayLike, **fields: Any) -> str:
    """Interactor answer as JSON text: ``{"mask": 0/1 rows of the crop, "bounds": [x1, y1, x2,
    y2], **fields}`` (compact; ``fields`` are JSON-encoded, e.g. ``points``).

    The crop is the inclusive bounding box: ``y2 - y1 + 1`` rows of ``x2 - x1 + 1`` values.
    CVAT's UI takes 0/1 or 0/255 (``shared/protocols/cvat.md``); 0/1 is the format's floor of
    two bytes per crop pixel. Raises ``ValueError`` for an empty mask.
    """
    m = _as_mask(mask)
    x1, y1, x2, y2 = _require_bbox(m)
    parts = [
        b'{"mask":' + _crop_rows_json(m[y1 : y2 + 1, x1 : x2 + 1]),
        b'"bounds":' + json.dumps([x1, y1, x2, y2], separators=(",", ":")).encode(),
    ]
    for key, value in fields.items():
        parts.append(json.dumps(key).encode() + b":" + _compact_json(value))
    return (b",".join(parts) + b"}").decode("ascii")


def mask_to_cvat_detector_json(mask: ArrayLike) -> str:
    """A CVAT *detector*'s ``mask`` field as JSON text: the crop of the inclusive bounding box,
    row by row in one flat 0/1 list, followed by ``x1, y1, x2, y2`` (CVAT's server cuts off the
    last four values and run-length encodes the rest: ``lambda_manager/views.py``,
    ``_call_detector.parse_anno``). The interactor format (:func:`mask_to_cvat_crop_json`:
    2-D rows and a separate ``bounds``) is not accepted there. Raises ``ValueError`` for an
    empty mask."""
    m = _as_mask(mask)
    x1, y1, x2, y2 = _require_bbox(m)
    crop = np.ascontiguousarray(m[y1 : y2 + 1, x1 : x2 + 1]).reshape(-1)
    chars = np.empty(2 * crop.size, np.uint8)  # "d," per pixel
    chars[0::2] = np.where(crop, ord("1"), ord("0"))
    chars[1::2] = ord(",")
    return "[" + chars.tobytes().decode("ascii") + f"{x1},{y1},{x2},{y2}]"


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def cvat_crop_to_mask(crop: Mapping[str, Any], height: int, width: int) -> BoolMask:
    """Inverse of :func:`mask_to_cvat_crop` (nonzero crop values are foreground)."""
    h, w = _check_size(height, width)
    try:
        rows, raw_bounds = crop["mask"], crop["bounds"]
    except (KeyError, TypeError) as exc:
        raise ValueError("CVAT crop must be a mapping with 'mask' and 'bounds'") from exc
    bounds = _as_ints(raw_bounds, "CVAT bounds")
    if bounds.size != 4:
        raise ValueError(f"CVAT bounds must be [x1, y1, x2, y2], got {raw_bounds!r}")
    _check_bounds(bounds, h, w)
    x1, y1, x2, y2 = (int(v) for v in bounds)
    m = np.asarray(rows)
    expected = (y2 - y1 + 1, x2 - x1 + 1)
    if m.shape != expected:
        raise ValueError(f"CVAT crop mask has shape {m.shape}, bounds need {expected}")
    out = np.zeros((h, w), dtype=bool)
    out[y1 : y2 + 1, x1 : x2 + 1] = _as_mask(m)
    return out
