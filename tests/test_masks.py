"""Mask codecs: byte identity with the Label Studio SDK, round trips, CVAT layouts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backends import masks as M

# pycocotools' Cython decoder trips NumPy 2's __array__(copy=...) deprecation; harmless.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

GRABCUT_GT = Path(__file__).parents[1] / ".." / "shared" / "datasets" / "GrabCut" / "boundary_GT"
GRABCUT_NAMES = ["106024", "124080", "181079", "banana1", "llama", "teddy"]


# ------------------------------------------------------------------------------------------
# Mask factories
# ------------------------------------------------------------------------------------------


def blobs(height: int, width: int, seed: int = 0, count: int = 3) -> np.ndarray:
    """A few filled, rotated ellipses (some overlapping, some touching the border)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((height, width), np.uint8)
    for _ in range(count):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (
            int(rng.integers(width // 8, width // 3)),
            int(rng.integers(height // 8, height // 3)),
        )
        cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return m.astype(bool)


def ring(size: int = 60, outer: int = 24, inner: int = 10) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.circle(m, (size // 2, size // 2), outer, 1, -1)
    cv2.circle(m, (size // 2, size // 2), inner, 0, -1)
    return m.astype(bool)


def noise(height: int, width: int, p: float = 0.5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) < p


SYNTHETIC = {
    "1x1_zero": np.zeros((1, 1), bool),
    "1x1_one": np.ones((1, 1), bool),
    "1x7_mixed": np.array([[0, 1, 1, 0, 1, 0, 0]], bool),
    "odd_3x5_noise": noise(3, 5, seed=1),
    "odd_37x53_noise": noise(37, 53, seed=2),
    "sparse_41x29": noise(41, 29, p=0.03, seed=3),
    "all_zero_40x30": np.zeros((40, 30), bool),
    "all_one_31x17": np.ones((31, 17), bool),
    # 128x128x4 = 65536 values: one maximal chunk; 128x256x4: exactly two; 129x131: a remainder.
    "all_one_128x128": np.ones((128, 128), bool),
    "all_one_128x256": np.ones((128, 256), bool),
    "all_one_129x131": np.ones((129, 131), bool),
    "blobs_97x123": blobs(97, 123, seed=4),
    "blobs_240x320": blobs(240, 320, seed=5, count=5),
    "ring_60": ring(),
    "long_runs": np.pad(np.ones((100, 400), bool), ((90, 90), (30, 30))),
}


def sdk_rle(mask: np.ndarray) -> list[int]:
    return mask2rle(mask.astype(np.uint8) * np.uint8(255))


def sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0


def grabcut_masks() -> list[tuple[str, np.ndarray]]:
    out = []
    for name in GRABCUT_NAMES:
        path = GRABCUT_GT / f"{name}.bmp"
        assert path.is_file(), f"GrabCut ground truth missing: {path}"
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert image is not None, f"cannot read {path}"
        out.append((name, image == 255))
    return out


# ------------------------------------------------------------------------------------------
# Label Studio brush RLE
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_ls_rle_identical_to_sdk(name: str) -> None:
    mask = SYNTHETIC[name]
    h, w = mask.shape
    ours = M.mask_to_ls_rle(mask)
    sdk = sdk_rle(mask)
    assert ours == sdk
    assert all(type(b) is int for b in ours)
    # The same bytes from a 0/255 uint8 and a 0/1 uint8 mask.
    assert M.mask_to_ls_rle(mask.astype(np.uint8) * 255) == sdk
    assert M.mask_to_ls_rle(mask.astype(np.uint8)) == sdk
    # Both decoders agree both ways.
    assert np.array_equal(M.ls_rle_to_mask(ours, h, w), mask)
    assert np.array_equal(M.ls_rle_to_mask(sdk, h, w), mask)
    assert np.array_equal(sdk_decode(ours, h, w), mask)


def test_ls_rle_identical_to_sdk_on_grabcut_masks() -> None:
    masks = grabcut_masks()
    assert len(masks) == len(GRABCUT_NAMES)
    for name, mask in masks:
        h, w = mask.shape
        assert mask.any() and not mask.all(), name
        ours = M.mask_to_ls_rle(mask)
        sdk = sdk_rle(mask)
        assert ours == sdk, name
        assert np.array_equal(M.ls_rle_to_mask(sdk, h, w), mask), name
        assert np.array_equal(sdk_decode(ours, h, w), mask), name


def test_ls_rle_non_contiguous_input() -> None:
    base = blobs(80, 120, seed=9)
    view = base[::2, 1::3]
    assert M.mask_to_ls_rle(view) == sdk_rle(np.ascontiguousarray(view))
    assert M.mask_to_ls_rle(base.T) == sdk_rle(np.ascontiguousarray(base.T))


def _run_array(lengths: list[int], seed: int = 0) -> np.ndarray:
    """Runs of the given lengths with neighbouring values always different."""
    rng = np.random.default_rng(seed)
    values, previous = [], -1
    for _ in lengths:
        value = int(rng.integers(0, 256))
        while value == previous:
            value = int(rng.integers(0, 256))
        values.append(value)
        previous = value
    return np.repeat(np.array(values, np.uint8), lengths)


@pytest.mark.parametrize(
    "lengths",
    [
        [1],
        [1, 1, 1, 2, 1],
        [2, 8, 9, 16, 17, 256, 257, 1, 3],
        [65536, 1, 65537, 2, 131072, 131073, 7],
        [300, 70000, 1, 1, 4],
    ],
)
def test_ls_encoder_matches_sdk_encode_rle_for_any_bytes(lengths: list[int]) -> None:
    """Covers the SDK's literal path (runs of 1) and its long-run splitting directly."""
    arr = _run_array(lengths)
    ours = M.ls_rle_encode_values(arr)
    assert ours == encode_rle(arr)
    assert np.array_equal(M.ls_rle_decode_values(ours), arr)


def test_ls_encoder_matches_sdk_encode_rle_on_random_bytes() -> None:
    rng = np.random.default_rng(7)
    for size in (1, 2, 5, 64, 999):
        arr = rng.integers(0, 4, size).astype(np.uint8)
        assert M.ls_rle_encode_values(arr) == encode_rle(arr)


def test_ls_padding_adds_a_zero_byte_when_already_aligned() -> None:
    """The SDK pads with 8 - bits % 8 zeros: a whole zero byte when the stream is aligned."""
    # 53 header bits + 15 (a run of 9) + 14 + 14 (two single values) = 96 bits, aligned.
    arr = _run_array([9, 1, 1])
    ours = M.ls_rle_encode_values(arr)
    assert ours == encode_rle(arr)
    assert len(ours) == 96 // 8 + 1 and ours[-1] == 0
    for n in range(1, 12):  # odd totals: 1..7 padding bits
        arr = _run_array([1] * n)
        ours = M.ls_rle_encode_values(arr)
        assert ours == encode_rle(arr)
        assert len(ours) == (53 + 14 * n) // 8 + 1


class _BitWriter:
    """A reference bit writer for hand-built streams (what the Label Studio front end emits)."""

    def __init__(self) -> None:
        self.bits = ""

    def write(self, value: int, width: int) -> None:
        self.bits += format(value, f"0{width}b")

    def to_list(self) -> list[int]:
        bits = self.bits + "0" * (-len(self.bits) % 8)
        return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_ls_decoder_handles_multi_word_literals_and_other_parameters() -> None:
    # thi.ng rle-pack (the front end) writes literal chunks of several words, which the SDK
    # encoder never does; use odd run-field sizes and a 6-bit word to exercise the header.
    sizes = [2, 5, 9, 12]
    word = 6
    rng = np.random.default_rng(11)
    expected: list[int] = []
    body = _BitWriter()
    for _ in range(60):
        k = int(rng.integers(0, 4))
        count = int(rng.integers(1, min(1 << sizes[k], 40) + 1))
        if rng.random() < 0.5:
            body.write(1, 1)
            body.write(k, 2)
            body.write(count - 1, sizes[k])
            value = int(rng.integers(0, 1 << word))
            body.write(value, word)
            expected += [value] * count
        else:
            body.write(0, 1)
            body.write(k, 2)
            body.write(count - 1, sizes[k])
            for _ in range(count):
                value = int(rng.integers(0, 1 << word))
                body.write(value, word)
                expected.append(value)
    stream = _BitWriter()
    stream.write(len(expected), 32)
    stream.write(word - 1, 5)
    for s in sizes:
        stream.write(s - 1, 4)
    stream.bits += body.bits
    rle = stream.to_list()
    ours = M.ls_rle_decode_values(rle)
    assert ours.tolist() == expected
    assert decode_rle(rle).tolist() == expected  # the SDK's reference decoder agrees


def test_ls_decoder_accepts_bytes() -> None:
    mask = blobs(30, 40, seed=2)
    rle = M.mask_to_ls_rle(mask)
    assert np.array_equal(M.ls_rle_to_mask(bytes(rle), 30, 40), mask)


def test_ls_decoder_rejects_wrong_count() -> None:
    mask = blobs(30, 40, seed=2)
    rle = M.mask_to_ls_rle(mask)
    with pytest.raises(ValueError, match=r"declares 4800 values .* needs 4680"):
        M.ls_rle_to_mask(rle, 30, 39)
    with pytest.raises(ValueError, match="declares"):
        M.ls_rle_to_mask(rle, 40, 30 + 1)


def test_ls_decoder_rejects_truncated_and_junk() -> None:
    rle = M.mask_to_ls_rle(blobs(30, 40, seed=2))
    with pytest.raises(ValueError, match="truncated"):
        M.ls_rle_to_mask(rle[: len(rle) // 2], 30, 40)
    with pytest.raises(ValueError, match="too short"):
        M.ls_rle_to_mask(rle[:4], 30, 40)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        M.ls_rle_to_mask([*rle[:-1], 256], 30, 40)


# ------------------------------------------------------------------------------------------
# COCO RLE
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_coco_rle_round_trip(name: str) -> None:
    mask = SYNTHETIC[name]
    rle = M.mask_to_coco_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    decoded = M.coco_rle_to_mask(json.loads(json.dumps(rle)))
    assert decoded.dtype == bool
    assert np.array_equal(decoded, mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert np.array_equal(M.coco_rle_to_mask(as_bytes), mask)


def test_coco_rle_uncompressed_counts() -> None:
    # Column-major runs: 2x3 mask [[0, 1, 1], [0, 1, 0]] -> 2 zeros, 3 ones, 1 zero.
    mask = M.coco_rle_to_mask({"size": [2, 3], "counts": [2, 3, 1]})
    assert mask.tolist() == [[False, True, True], [False, True, False]]
    with pytest.raises(ValueError):
        M.coco_rle_to_mask({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError):
        M.coco_rle_to_mask({"counts": "abc"})


# ------------------------------------------------------------------------------------------
# CVAT
# ------------------------------------------------------------------------------------------

NON_EMPTY = sorted(k for k, v in SYNTHETIC.items() if v.any())


@pytest.mark.parametrize("name", NON_EMPTY)
def test_cvat_rle_round_trip(name: str) -> None:
    mask = SYNTHETIC[name]
    h, w = mask.shape
    rle = M.mask_to_cvat_rle(mask)
    x1, y1, x2, y2 = rle[-4:]
    assert (x1, y1, x2, y2) == M.mask_bbox(mask)
    assert sum(rle[:-4]) == (x2 - x1 + 1) * (y2 - y1 + 1)
    assert all(r > 0 for r in rle[1:-4])  # only the leading background run may be 0
    assert np.array_equal(M.cvat_rle_to_mask(rle, h, w), mask)
    assert np.array_equal(M.cvat_rle_to_mask([float(v) for v in rle], h, w), mask)


def test_cvat_rle_layout() -> None:
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = mask[1, 4] = True
    mask[3, 2:5] = True
    # Crop x 2..4, y 1..3 (3x3): row 1 "101", row 2 "000", row 3 "111".
    assert M.mask_to_cvat_rle(mask) == [0, 1, 1, 1, 3, 3, 2, 1, 4, 3]

    starts_with_background = np.zeros((4, 4), bool)
    starts_with_background[1, 2] = starts_with_background[2, 1] = True
    rle = M.mask_to_cvat_rle(starts_with_background)
    assert rle == [1, 2, 1, 1, 1, 2, 2]


def test_cvat_rle_crop_starting_with_foreground_has_zero_first_run() -> None:
    mask = np.zeros((20, 30), bool)
    mask[4:9, 6:15] = True
    rle = M.mask_to_cvat_rle(mask)
    assert rle == [0, 45, 6, 4, 14, 8]
    assert np.array_equal(M.cvat_rle_to_mask(rle, 20, 30), mask)


def test_cvat_rle_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty mask"):
        M.mask_to_cvat_rle(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="sum"):
        M.cvat_rle_to_mask([0, 5, 0, 0, 2, 2], 5, 5)
    with pytest.raises(ValueError, match="bounds"):
        M.cvat_rle_to_mask([0, 9, 3, 3, 5, 5], 5, 5)


@pytest.mark.parametrize("name", NON_EMPTY)
def test_cvat_crop_round_trip(name: str) -> None:
    mask = SYNTHETIC[name]
    h, w = mask.shape
    crop = json.loads(M.mask_to_cvat_crop_json(mask))
    x1, y1, x2, y2 = crop["bounds"]
    assert (x1, y1, x2, y2) == M.mask_bbox(mask)
    rows = crop["mask"]
    assert len(rows) == y2 - y1 + 1
    assert all(len(row) == x2 - x1 + 1 for row in rows)
    values = {v for row in rows for v in row}
    assert values <= {0, 1} and 1 in values
    assert all(type(v) is int for row in rows for v in row)
    assert np.array_equal(M.cvat_crop_to_mask(crop, h, w), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (64, 3)])
def test_cvat_crop_json_equals_json_dumps(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    crop = rng.random(shape) < 0.5
    crop[0, 0] = True  # the bounding box is the whole array
    crop[-1, -1] = True
    expected = {"mask": crop.astype(int).tolist(), "bounds": [0, 0, shape[1] - 1, shape[0] - 1]}
    text = M.mask_to_cvat_crop_json(crop, points=[[0, 0]])
    assert text == json.dumps({**expected, "points": [[0, 0]]}, separators=(",", ":"))


def test_cvat_crop_json_is_two_bytes_per_pixel() -> None:
    mask = np.ones((396, 557), bool)  # a 1080p frame's object, as measured for the README
    size = len(M.mask_to_cvat_crop_json(mask))
    assert size < 2 * mask.size + 2 * mask.shape[0] + 64


def test_cvat_crop_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty mask"):
        M.mask_to_cvat_crop_json(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        M.cvat_crop_to_mask({"mask": [[255, 0]], "bounds": [0, 0, 2, 0]}, 5, 5)
    with pytest.raises(ValueError, match="bounds"):
        M.cvat_crop_to_mask({"mask": [[255]], "bounds": [5, 0, 5, 0]}, 5, 5)


# ------------------------------------------------------------------------------------------
# Bounding box
# ------------------------------------------------------------------------------------------


def test_mask_bbox() -> None:
    assert M.mask_bbox(np.zeros((4, 4), bool)) is None
    mask = np.zeros((10, 12), np.uint8)
    mask[3, 7] = 200
    assert M.mask_bbox(mask) == (7, 3, 7, 3)
    mask[8, 1] = 1
    assert M.mask_bbox(mask) == (1, 3, 7, 8)
    assert all(type(v) is int for v in M.mask_bbox(mask))


# ------------------------------------------------------------------------------------------
# Polygons
# ------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("seed", range(6))
def test_polygons_round_trip_blobs(seed: int) -> None:
    mask = blobs(240, 320, seed=seed)
    polygons = M.mask_to_polygons(mask, tolerance=1.0)
    assert polygons and not any(p.is_hole for p in polygons)
    for p in polygons:
        assert p.points.ndim == 2 and p.points.shape[1] == 2 and len(p.points) >= 3
        assert p.points.dtype == np.float64
    assert iou(M.polygons_to_mask(polygons, 240, 320), mask) >= 0.95
    # tolerance 0 keeps the traced outline: an exact round trip.
    exact = M.mask_to_polygons(mask, tolerance=0, holes=True, min_area=0)
    assert np.array_equal(M.polygons_to_mask(exact, 240, 320), mask)


def test_polygons_coordinates_are_pixel_centres() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:8] = True  # rows 2..4, columns 3..7
    (poly,) = M.mask_to_polygons(mask, tolerance=0)
    xs, ys = poly.points[:, 0], poly.points[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (3, 7, 2, 4)
    assert poly.area == 4 * 2


def test_polygons_holes() -> None:
    mask = ring()
    without = M.mask_to_polygons(mask)
    assert len(without) == 1 and not without[0].is_hole
    with_holes = M.mask_to_polygons(mask, holes=True)
    assert [p.is_hole for p in with_holes] == [False, True]
    assert with_holes[1].area < with_holes[0].area
    assert iou(M.polygons_to_mask(with_holes, *mask.shape), mask) >= 0.95
    filled = M.polygons_to_mask(without, *mask.shape)
    assert filled[30, 30] and not mask[30, 30]  # the hole is filled when holes are dropped


def test_polygons_island_inside_hole_survives_round_trip() -> None:
    mask = ring(80, 36, 20)
    cv2.circle(mask.view(np.uint8), (40, 40), 8, 1, -1)
    polygons = M.mask_to_polygons(mask, tolerance=0, holes=True)
    assert [p.is_hole for p in polygons] == [False, True, False]
    assert np.array_equal(M.polygons_to_mask(polygons, 80, 80), mask)


def test_polygons_largest_only_and_order() -> None:
    mask = np.zeros((100, 100), bool)
    mask[5:15, 5:15] = True  # small
    mask[40:90, 30:95] = True  # large
    mask[20:35, 60:80] = True  # medium
    all_polys = M.mask_to_polygons(mask, tolerance=0)
    assert len(all_polys) == 3
    assert [p.area for p in all_polys] == sorted((p.area for p in all_polys), reverse=True)
    (largest,) = M.mask_to_polygons(mask, largest_only=True)
    assert (largest.points[:, 0].min(), largest.points[:, 1].min()) == (30, 40)
    points = M.largest_polygon(mask, 1.0)
    assert points == largest.to_list()
    assert all(isinstance(v, float) for pt in points for v in pt)
    assert M.largest_polygon(np.zeros((5, 5), bool)) == []


def test_polygons_drop_degenerate_and_small() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5, 5] = True  # single pixel: < 3 points
    mask[10, 2:30] = True  # 1-px L-shaped line: zero area
    mask[10:30, 29] = True
    mask[20:23, 20:23] = True  # 3x3: area 4
    polys = M.mask_to_polygons(mask, tolerance=0)
    assert len(polys) == 1 and polys[0].area == 4
    assert M.mask_to_polygons(mask, tolerance=0, min_area=5) == []
    assert len(M.mask_to_polygons(mask, tolerance=0, min_area=0)) == 2  # and the line
    assert M.mask_to_polygons(np.zeros((8, 8), bool)) == []


def test_polygons_accept_plain_point_lists() -> None:
    square = [[2, 2], [6, 2], [6, 6], [2, 6]]
    out = M.polygons_to_mask([square], 10, 10)
    assert out.sum() == 25 and out[2:7, 2:7].all()


def test_polygon_to_percent() -> None:
    pts = np.array([[0.0, 0.0], [50.0, 25.0], [100.0, 50.0]])
    assert M.polygon_to_percent(pts, 200, 100) == [[0.0, 0.0], [25.0, 25.0], [50.0, 50.0]]
    poly = M.Polygon(points=pts)
    assert M.polygon_to_percent(poly, 200, 100) == M.polygon_to_percent(pts, 200, 100)
    with pytest.raises(ValueError):
        M.polygon_to_percent(pts, 0, 100)


# ------------------------------------------------------------------------------------------
# Bad input everywhere
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        M.mask_to_polygons,
        M.largest_polygon,
        M.mask_to_coco_rle,
        M.mask_to_ls_rle,
        M.mask_to_cvat_rle,
        M.mask_to_cvat_crop_json,
        M.mask_bbox,
    ],
)
@pytest.mark.parametrize("shape", [(4, 4, 3), (16,), ()])
def test_non_2d_masks_rejected(encode, shape) -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode(np.ones(shape, np.uint8))


def test_coco_rle_decodes_row_major():
    mask = np.zeros((7, 5), bool)
    mask[2:5, 1:3] = True
    back = M.coco_rle_to_mask(M.mask_to_coco_rle(mask))
    assert back.flags.c_contiguous and np.array_equal(back, mask)
