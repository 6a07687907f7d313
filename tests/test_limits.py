"""The limit pieces on their own: settings and README, bounded JSON, declared frames, labels,
image URLs and the download deadline (the servers' tests are ``test_limits_*.py``)."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from backends import jsonbody, settings
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.errors import (
    BadImageUrl,
    BadRequest,
    DeclaredSizeMismatch,
    DeclaredSizeTooLarge,
    ImageTimeout,
    ImageUrlTooLong,
    JsonTooDeep,
    NumberTooLong,
    UnknownLabel,
)
from backends.labelstudio.app import Settings, create_app
from backends.labelstudio.client import Credentials, ImageClient, check_url
from backends.labelstudio.frames import frame_for
from backends.labelstudio.labelconfig import LabelConfig
from backends.models.grabcut import GrabCutSegmenter
from tests.conftest import REPO
from tests.support.servers import MisbehavingImageHost

# --------------------------------------------------------------------------------------------
# Settings and the README table


def _readme_limits() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]


def test_readme_limits_lists_every_setting_with_its_default_and_answer():
    rows = {
        match.group(1): line
        for line in _readme_limits().splitlines()
        if (match := re.match(r"\| `(TAPMASK_[A-Z_]+)` \|", line))
    }
    assert set(rows) == set(settings.LIMITS)
    for env, limit in settings.LIMITS.items():
        cells = [cell.strip() for cell in rows[env].strip("|").split("|")]
        assert cells[1] == limit.default_text, env
        assert cells[-1] == limit.answer, env


def test_limits_read_the_environment_and_refuse_unusable_values(monkeypatch):
    assert settings.MAX_OBJECTS.value() == 32
    monkeypatch.setenv("TAPMASK_MAX_OBJECTS", "5")
    monkeypatch.setenv("TAPMASK_DOWNLOAD_DEADLINE_S", "2.5")
    assert int(settings.MAX_OBJECTS) == 5 and float(settings.DOWNLOAD_DEADLINE_S) == 2.5
    settings.check_limits()
    for bad in ("lots", "0", "-3", "2.5"):
        monkeypatch.setenv("TAPMASK_MAX_OBJECTS", bad)
        with pytest.raises(ValueError, match="TAPMASK_MAX_OBJECTS"):
            settings.check_limits()
    with pytest.raises(ValueError, match="TAPMASK_MAX_OBJECTS"):  # the server does not start
        create_app(LocalDispatcher(Engine({"grabcut": GrabCutSegmenter()})), Settings())


# --------------------------------------------------------------------------------------------
# Bounded JSON


def test_json_nesting_is_counted_outside_strings_only():
    assert jsonbody.loads(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(JsonTooDeep, match="65 levels"):
        jsonbody.loads(b"[" * 65 + b"]" * 65)
    tricky = b'{"a": "[[[[\\"{{{{\\\\", "b": [[1]]}'  # brackets, escaped quote and backslash
    assert jsonbody.loads(tricky) == {"a": '[[[["{{{{\\', "b": [[1]]}
    with pytest.raises(JsonTooDeep):
        jsonbody.loads(b"[" * 200_000)  # not even valid JSON: refused by depth first
    with pytest.raises(JsonTooDeep):
        jsonbody.check_depth({"a": [[[[[]]]]]} | {"deep": _deep(64)})
    jsonbody.check_depth({"deep": _deep(63)})


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_numbers_are_bounded_by_digits_but_strings_are_not(monkeypatch):
    assert jsonbody.loads(b"[" + b"9" * 100 + b"]") == [int("9" * 100)]
    with pytest.raises(NumberTooLong):
        jsonbody.loads(b"[" + b"9" * 101 + b"]")
    with pytest.raises(NumberTooLong):
        jsonbody.loads(b"[0." + b"1" * 150 + b"]")
    assert jsonbody.loads(b'["' + b"9" * 5000 + b'"]') == ["9" * 5000]
    values = jsonbody.loads(b"[NaN, Infinity, -Infinity, 1e999]")
    assert np.isnan(values[0]) and values[1:] == [np.inf, -np.inf, np.inf]
    monkeypatch.setenv("TAPMASK_MAX_NUMBER_DIGITS", "3")
    monkeypatch.setenv("TAPMASK_MAX_JSON_DEPTH", "2")
    with pytest.raises(NumberTooLong, match="TAPMASK_MAX_NUMBER_DIGITS"):
        jsonbody.loads(b"[1234]")
    with pytest.raises(JsonTooDeep, match="TAPMASK_MAX_JSON_DEPTH"):
        jsonbody.loads(b"[[[]]]")
    for broken in (b"{nope", b'{"a": "\xff"}', b"[1,]"):
        with pytest.raises(BadRequest):
            jsonbody.loads(broken)


def test_a_large_realistic_body_is_checked_in_a_fraction_of_its_parse_time():
    rng = np.random.default_rng(0)
    rle = ",".join(map(str, rng.integers(0, 255, 500_000))).encode()
    raw = b'{"tasks": [{"annotations": [{"result": [{"value": {"rle": [' + rle + b"]}}]}]}]}"
    started = time.perf_counter()
    jsonbody.check_text(raw)
    checked = time.perf_counter() - started
    started = time.perf_counter()
    json.loads(raw)
    assert checked < time.perf_counter() - started  # the bounds cost less than the parse


# --------------------------------------------------------------------------------------------
# Declared frames


def test_declared_frames_same_scaled_stored_or_refused(monkeypatch):
    assert frame_for(640, 480, 480, 640).kind == "same"
    assert frame_for(320, 240, 480, 640).kind == "scaled"
    assert frame_for(427, 320, 3000, 4000).kind == "scaled"  # rounded by the resizer
    assert frame_for(640, 480, 640, 480, orientation=6).kind == "stored"
    assert frame_for(320, 240, 640, 480, orientation=8).kind == "stored"
    with pytest.raises(DeclaredSizeMismatch, match="480×640"):
        frame_for(480, 640, 480, 640)  # swapped, but no EXIF rotation: not this image
    with pytest.raises(DeclaredSizeMismatch):
        frame_for(640, 640, 480, 640, orientation=6)
    with pytest.raises(DeclaredSizeTooLarge, match="original_width"):
        frame_for(100_000, 100_000, 480, 640)
    monkeypatch.setenv("TAPMASK_MAX_PIXELS", "1000")
    with pytest.raises(DeclaredSizeTooLarge, match="TAPMASK_MAX_PIXELS"):
        frame_for(40, 30, 30, 40)


def _exif_png(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_the_stored_frame_maps_clicks_and_masks_like_pil_rotates_pixels(orientation):
    height, width = 6, 8
    for y, x in [(0, 0), (2, 1), (5, 7), (1, 6)]:
        stored = np.zeros((height, width), np.uint8)
        stored[y, x] = 255
        displayed = np.asarray(
            ImageOps.exif_transpose(Image.open(io.BytesIO(_exif_png(stored, orientation))))
        )
        frame = frame_for(width, height, *displayed.shape, orientation=orientation)
        px, py = frame.point(x + 0.5, y + 0.5)  # the pixel's centre, in pixel-edge units
        assert displayed[int(py), int(px)] == 255
        assert np.array_equal(frame.mask(displayed > 0), stored > 0)


def test_a_scaled_frame_resizes_the_mask_to_the_declared_size():
    frame = frame_for(20, 10, 40, 80)
    assert frame.point(10, 5) == (40.0, 20.0)
    mask = np.zeros((40, 80), bool)
    mask[:20, :40] = True
    small = frame.mask(mask)
    assert small.shape == (10, 20) and small[:5, :10].all() and not small[5:, :].any()


# --------------------------------------------------------------------------------------------
# Labels


LABELS = """<View><Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">{brush}</BrushLabels>
  <PolygonLabels name="poly" toName="image">{poly}</PolygonLabels>
</View>"""


def _config(brush: list[str], poly: list[str]) -> LabelConfig:
    def labels(names: list[str]) -> str:
        return "".join(f'<Label value="{name}"/>' for name in names)

    return LabelConfig.parse(LABELS.format(brush=labels(brush), poly=labels(poly)))


def _chosen(config: LabelConfig, label: str | None) -> list[tuple[str, str]]:
    return [(control.name, value) for control, value in config.outputs_for("image", label)]


def test_a_label_is_matched_by_name_then_case_then_a_sole_label(caplog):
    config = _config(["Object", "Other"], ["Object"])
    with caplog.at_level(logging.WARNING, "tapmask.labelstudio"):
        assert _chosen(config, "Object") == [("brush", "Object"), ("poly", "Object")]
        assert _chosen(config, "Other") == [("brush", "Other")]
        assert not caplog.records
        assert _chosen(config, "other") == [("brush", "Other")]
        assert _chosen(config, "Ghost") == [("poly", "Object")]  # the only one-label control
    assert [r.getMessage().split(": answering")[0] for r in caplog.records] == [
        "label 'other' is not defined by BrushLabels 'brush' (labels: Object, Other), "
        "PolygonLabels 'poly' (labels: Object)",
        "label 'Ghost' is not defined by BrushLabels 'brush' (labels: Object, Other), "
        "PolygonLabels 'poly' (labels: Object)",
    ]
    assert _chosen(config, None) == [("brush", "Object")]


def test_an_ambiguous_unknown_label_is_refused_naming_the_labels():
    config = _config(["Object", "Other"], ["Car", "Bus"])
    with pytest.raises(UnknownLabel) as info:
        config.outputs_for("image", "Ghost")
    assert info.value.status == 422 and info.value.code == "unknown_label"
    assert "'Ghost'" in str(info.value) and "Object, Other" in str(info.value)
    assert "Car, Bus" in str(info.value)


# --------------------------------------------------------------------------------------------
# Image URLs and the download deadline


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://[::1", BadImageUrl),
        ("http://[::1]:80/a.jpg\r\nHost: evil", BadImageUrl),
        ("/data/upload/a\0.jpg", BadImageUrl),
        ("ftp://host/a.jpg", BadImageUrl),
        ("javascript:alert(1)", BadImageUrl),
        ("http://", BadImageUrl),
        ("https://host:70000/a.jpg", BadImageUrl),
        ("/data/" + "a" * 9000, ImageUrlTooLong),
    ],
)
def test_malformed_image_urls_are_refused_before_any_connection(url, error):
    with pytest.raises(error) as info:
        check_url(url)
    assert 400 <= info.value.status < 500
    client = ImageClient()
    with pytest.raises(error):
        client.fetch(url, Credentials("http://127.0.0.1:9", None))  # nothing listens there


def test_ordinary_urls_pass(monkeypatch):
    for url in (
        "/data/upload/1/398aae7e-blob.png",
        "/data/local-files/?d=folder/my image.jpg",
        "https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc&X-Amz-Date=1",
        "http://[::1]:8080/a.jpg",
        "/data/upload/1/caf\u00e9.jpg",
    ):
        check_url(url)
    monkeypatch.setenv("TAPMASK_MAX_URL_CHARS", "10")
    with pytest.raises(ImageUrlTooLong, match="TAPMASK_MAX_URL_CHARS"):
        check_url("/data/upload/1/a.png")


@pytest.mark.parametrize(("path", "seconds"), [("/stall", 0.5), ("/trickle", 1.0)])
def test_a_download_ends_at_its_read_timeout_or_deadline(path, seconds):
    host = MisbehavingImageHost(trickle_every=0.1)
    try:
        client = ImageClient(timeout=0.5, deadline=1.0)
        started = time.perf_counter()
        with pytest.raises(ImageTimeout) as info:
            client.fetch(f"{host.url}{path}", Credentials(None, None))
        elapsed = time.perf_counter() - started
        assert info.value.status == 504 and info.value.code == "image_timeout"
        assert seconds - 0.1 < elapsed < seconds + 0.5
    finally:
        host.close()
