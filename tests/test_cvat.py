"""The CVAT nuclio handler, driven like nuclio runs it and checked like CVAT's UI reads it.

Requests are built as CVAT's lambda manager builds them (``tests/support/cvat_harness.py``);
each function is configured from its own ``serverless/<name>/nuclio/function.yaml``
environment, with test overrides only for checkpoints (tiny random SAMs instead of the
official files).
"""

from __future__ import annotations

import base64
import io
import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from backends import images
from backends.cvat import formats
from backends.cvat.handler import (
    MODE_DECODE,
    MODE_EMBEDDING,
    handler,
    settings_from_env,
)
from backends.errors import EmptyMask, ModelLoadError, PromptError
from backends.prompts import Box, Click, Prompt, Segmentation
from tests.conftest import TINY_SAM
from tests.support.cvat_harness import (
    NuclioFunction,
    check_error_reply,
    check_mask_reply,
    cvat_payload,
    decode_blob,
    function_env,
    iou,
    nuclio_event,
    png_header,
)

# --------------------------------------------------------------------------------------------
# Test data: one GrabCut-benchmark image and its ground truth


class Sample:
    def __init__(self, grabcut_dir):
        self.file = (grabcut_dir / "data_GT" / "flower.jpg").read_bytes()
        self.rgb = images.decode(self.file)
        gt = np.asarray(Image.open(grabcut_dir / "boundary_GT" / "flower.bmp"))
        gt = gt if gt.ndim == 2 else gt[..., 0]
        self.object = gt == 255
        self.valid = gt != 128  # the ignore band around the boundary
        self.height, self.width = self.object.shape
        assert self.rgb.shape[:2] == self.object.shape
        # "near the object centre": the object pixel farthest from its boundary
        dist = cv2.distanceTransform(self.object.astype(np.uint8), cv2.DIST_L2, 5)
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        self.click = (float(x) + 0.4, float(y) + 0.3)  # CVAT sends sub-pixel floats
        ys, xs = np.nonzero(self.object)
        self.box = [
            [float(xs.min()) - 6.5, float(ys.min()) - 6.5],
            [float(xs.max()) + 6.5, float(ys.max()) + 6.5],
        ]
        self.background = (5.0, 5.0)

    def iou(self, mask):
        return iou(mask, self.object, self.valid)


@pytest.fixture(scope="module")
def flower(grabcut_dir):
    return Sample(grabcut_dir)


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def image_variant(sample: Sample, kind: str) -> bytes:
    """The same picture in the file formats and PIL modes CVAT may hand over."""
    rgb = Image.fromarray(sample.rgb)
    if kind == "jpeg":
        return sample.file  # the original benchmark file
    if kind == "png":
        return _encode(rgb, "PNG")
    if kind == "gray":
        return _encode(rgb.convert("L"), "PNG")
    if kind == "rgba":
        rgba = rgb.convert("RGBA")
        alpha = np.full((sample.height, sample.width), 255, np.uint8)
        alpha[:4, :] = 0  # a transparent strip, composited on white
        rgba.putalpha(Image.fromarray(alpha))
        return _encode(rgba, "PNG")
    if kind == "png16":
        gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert gray16.mode == "I;16"
        data = _encode(gray16, "PNG")
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        return data
    if kind == "palette":
        return _encode(rgb.quantize(64), "PNG")
    if kind == "cmyk":
        return _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    if kind == "exif_jpeg":
        # Stored rotated, displayed upright: orientation 6 = rotate 90° clockwise to display.
        stored = Image.fromarray(np.ascontiguousarray(np.rot90(sample.rgb, k=1)))
        exif = Image.Exif()
        exif[0x0112] = 6
        return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# GrabCut function (CPU, weights-free): formats, box variants, bad input


@pytest.fixture(scope="module")
def grabcut_fn():
    return NuclioFunction(function_env("grabcut"))


@pytest.mark.parametrize(
    "kind", ["jpeg", "png", "gray", "rgba", "png16", "palette", "cmyk", "exif_jpeg"]
)
def test_grabcut_function_answers_every_image_mode(grabcut_fn, flower, kind):
    data = image_variant(flower, kind)
    if kind == "exif_jpeg":
        assert Image.open(io.BytesIO(data)).size == (flower.height, flower.width)  # stored rotated
    reply = grabcut_fn.call(cvat_payload(data, [flower.click]))
    mask = check_mask_reply(reply, flower.width, flower.height)
    assert flower.iou(mask) >= 0.5, f"{kind}: IoU {flower.iou(mask):.3f}"
    assert mask[int(flower.click[1]), int(flower.click[0])]


@pytest.mark.parametrize("obj_bbox", ["empty", "null", "box", "box-reversed"])
def test_grabcut_function_obj_bbox_variants(grabcut_fn, flower, obj_bbox):
    box = {
        "empty": [],
        "null": None,
        "box": flower.box,
        "box-reversed": [flower.box[1], flower.box[0]],  # dragged from bottom-right
    }[obj_bbox]
    data = image_variant(flower, "png")
    reply = grabcut_fn.call(cvat_payload(data, [flower.click], [flower.background], box))
    mask = check_mask_reply(reply, flower.width, flower.height)
    assert flower.iou(mask) >= 0.5


def test_grabcut_function_box_alone(grabcut_fn, flower):
    reply = grabcut_fn.call(cvat_payload(flower.file, [], [], flower.box))
    mask = check_mask_reply(reply, flower.width, flower.height)
    assert flower.iou(mask) >= 0.5


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "text/plain", "application/octet-stream"]
)
def test_body_as_bytes_is_json_decoded(grabcut_fn, flower, content_type):
    event = nuclio_event(cvat_payload(flower.file, [flower.click]), content_type)
    assert isinstance(event.body, bytes)
    mask = check_mask_reply(grabcut_fn.call_event(event), flower.width, flower.height)
    assert flower.iou(mask) >= 0.5


def test_reply_is_a_crop_with_polygon_not_a_frame_sized_mask(grabcut_fn, flower):
    reply = grabcut_fn.call(cvat_payload(flower.file, [flower.click]))
    body = reply.json
    assert set(body) == {"mask", "bounds", "points"}
    x1, y1, x2, y2 = body["bounds"]
    assert (x2 - x1 + 1) * (y2 - y1 + 1) < flower.width * flower.height
    polygon = np.asarray(body["points"])
    assert polygon.dtype.kind == "i"  # whole pixels
    inside = cv2.pointPolygonTest(
        polygon.reshape(-1, 1, 2).astype(np.int32), (flower.click[0], flower.click[1]), False
    )
    assert inside >= 0


def _bad_requests(sample: Sample):
    good = cvat_payload(sample.file, [sample.click])
    with_nan = dict(good, pos_points=[[float("nan"), 10.0]])
    return {
        "not-json": (b'{"image": "abc", ', "application/json", 400),
        "empty-body": (b"", "application/json", 400),
        "json-array": (b"[1, 2, 3]", "application/json", 400),
        "missing-image": ({k: v for k, v in good.items() if k != "image"}, None, 400),
        "image-not-string": (dict(good, image=1234), None, 400),
        "bad-base64": (dict(good, image="not*base64!"), None, 400),
        "not-an-image": (dict(good, image=base64.b64encode(b"hello" * 50).decode()), None, 400),
        "truncated-jpeg": (
            dict(good, image=base64.b64encode(sample.file[:300]).decode()),
            None,
            400,
        ),
        "200-megapixel": (
            dict(good, image=base64.b64encode(png_header(20000, 10000)).decode()),
            None,
            413,
        ),
        "point-outside": (dict(good, pos_points=[[sample.width * 3.0, 10.0]]), None, 400),
        "negative-outside": (dict(good, neg_points=[[10.0, -500.0]]), None, 400),
        "nan-dict": (with_nan, None, 400),
        "nan-bytes": (
            json.dumps(with_nan).encode(),  # json.dumps writes NaN; json.loads reads it back
            "application/json; charset=utf-8",
            400,
        ),
        "point-not-pair": (dict(good, pos_points=[[1.0, 2.0, 3.0]]), None, 400),
        "point-strings": (dict(good, pos_points=[["10", "20"]]), None, 400),
        "point-bool": (dict(good, pos_points=[[True, 20]]), None, 400),
        "points-not-list": (dict(good, pos_points="10,20"), None, 400),
        "bbox-one-corner": (dict(good, obj_bbox=[[1.0, 2.0]]), None, 400),
        "bbox-outside": (dict(good, obj_bbox=[[0, 0], [1e6, 1e6]]), None, 400),
        "threshold-text": (dict(good, threshold="high"), None, 400),
        "threshold-range": (dict(good, threshold=2.5), None, 400),
        "no-clicks": (dict(good, pos_points=[], neg_points=[], obj_bbox=[]), None, 400),
        "negatives-only": (dict(good, pos_points=[], neg_points=[[5.0, 5.0]]), None, 400),
    }


BAD = [
    "not-json",
    "empty-body",
    "json-array",
    "missing-image",
    "image-not-string",
    "bad-base64",
    "not-an-image",
    "truncated-jpeg",
    "200-megapixel",
    "point-outside",
    "negative-outside",
    "nan-dict",
    "nan-bytes",
    "point-not-pair",
    "point-strings",
    "point-bool",
    "points-not-list",
    "bbox-one-corner",
    "bbox-outside",
    "threshold-text",
    "threshold-range",
    "no-clicks",
    "negatives-only",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_a_clear_4xx_and_the_worker_keeps_serving(grabcut_fn, flower, case, caplog):
    payload, content_type, status = _bad_requests(flower)[case]
    reply = grabcut_fn.call(payload, content_type or "application/json")
    body = check_error_reply(reply, status)
    assert "Traceback" not in body["detail"]
    logged = _errors_logged(caplog)  # CVAT shows only the status: the details are in the log
    assert logged and logged[-1]["status"] == status and logged[-1]["error"]
    good = grabcut_fn.call(cvat_payload(flower.file, [flower.click]))
    check_mask_reply(good, flower.width, flower.height)


def _errors_logged(caplog) -> list[dict]:
    """The ``with`` fields of the handler's ``context.logger.error_with`` calls."""
    return [
        getattr(record, "with", {})
        for record in caplog.records
        if record.levelname == "ERROR" and "request failed" in record.getMessage()
    ]


def test_unexpected_exception_is_a_500_json_and_the_worker_keeps_serving(
    flower, monkeypatch, caplog
):
    fn = NuclioFunction(function_env("grabcut"))
    check_mask_reply(
        fn.call(cvat_payload(flower.file, [flower.click])), flower.width, flower.height
    )

    def boom(*args, **kwargs):
        raise RuntimeError("GPU on fire")

    monkeypatch.setattr(fn.user_data.dispatcher, "segment", boom)
    body = check_error_reply(fn.call(cvat_payload(flower.file, [flower.click])), 500)
    assert body["error"] == "internal_error" and "GPU on fire" in body["detail"]
    logged = _errors_logged(caplog)[-1]
    assert logged["status"] == 500 and "GPU on fire" in logged["traceback"]

    monkeypatch.setattr(
        fn.user_data.dispatcher,
        "segment",
        lambda *a, **k: Segmentation(np.zeros((flower.height, flower.width), bool), 0.1, "x"),
    )
    body = check_error_reply(fn.call(cvat_payload(flower.file, [flower.click])), 422)
    assert body["error"] == "empty_mask"

    monkeypatch.undo()
    check_mask_reply(
        fn.call(cvat_payload(flower.file, [flower.click])), flower.width, flower.height
    )


def test_second_click_on_the_same_frame_reuses_the_decoded_image(flower):
    fn = NuclioFunction(function_env("grabcut"))
    first = fn.call(cvat_payload(flower.file, [flower.click]))
    check_mask_reply(first, flower.width, flower.height)
    second = fn.call(cvat_payload(flower.file, [flower.click], [flower.background]))
    check_mask_reply(second, flower.width, flower.height)
    engine = fn.engine
    assert engine.images.stats.misses == 1 and engine.images.stats.hits >= 1  # decoded once
    assert engine.stats.encodes == 1 and engine.stats.decodes == 2


def test_init_context_failure_is_logged_and_raised(tmp_path, caplog):
    fn = NuclioFunction(function_env("sam") | {"SAM_CHECKPOINT": str(tmp_path / "missing.pth")})
    with pytest.raises(ModelLoadError, match="not found"):
        fn.call({"image": "", "pos_points": [[1, 1]]})
    assert any("cannot start the function" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# SAM, decoded on the server (tiny random-weight SAM through the real loader)


@pytest.fixture(scope="module")
def tiny_sam_fn(tiny_sam_checkpoint):
    env = function_env("sam") | {
        "SAM_CHECKPOINT": str(tiny_sam_checkpoint),
        "TAPMASK_MODEL_OPTIONS": json.dumps({"architecture": TINY_SAM}),
    }
    return NuclioFunction(env)


def test_sam_function_decodes_clicks_and_boxes(tiny_sam_fn, flower):
    data = image_variant(flower, "png")
    for pos, neg, box in [
        ([flower.click], [], []),
        ([flower.click], [flower.background], None),
        ([], [], flower.box),
        ([flower.click], [], flower.box),
    ]:
        reply = tiny_sam_fn.call(cvat_payload(data, pos, neg, box))
        if reply.status == 422:  # random weights may find nothing: a clean, typed answer
            assert check_error_reply(reply)["error"] == "empty_mask"
        else:
            check_mask_reply(reply, flower.width, flower.height)
    assert tiny_sam_fn.engine.stats.encodes == 1  # one encode for every request on the frame


def test_sam_click_sequence_decodes_one_click_per_request_in_click_order(
    tiny_sam_checkpoint, flower
):
    env = function_env("sam") | {
        "SAM_CHECKPOINT": str(tiny_sam_checkpoint),
        "TAPMASK_MODEL_OPTIONS": json.dumps({"architecture": TINY_SAM}),
    }
    fn = NuclioFunction(env)
    p1, n1, p2 = flower.click, flower.background, (flower.click[0] + 15.2, flower.click[1] + 9.9)
    # The annotator clicks P1, then N1, then P2; CVAT sends two lists each time.
    steps = [([p1], []), ([p1], [n1]), ([p1, p2], [n1])]
    for number, (pos, neg) in enumerate(steps, start=1):
        reply = fn.call(cvat_payload(flower.file, pos, neg))
        assert reply.status in (200, 422), reply.text
        stats = fn.engine.stats
        assert stats.encodes == 1, "the frame is encoded once"
        assert stats.decodes == number, "each request decodes only its new click"
    assert fn.engine.images.stats.misses == 1, "the frame is decoded once"
    key = images.sha256(flower.file)
    real_order = Prompt((Click(*p1, True), Click(*n1, False), Click(*p2, True))).validated(
        flower.width, flower.height
    )
    assert ("sam", key, real_order.key()) in fn.engine.states
    model = fn.engine.model("sam")
    assert model.encode_calls == 1


# --------------------------------------------------------------------------------------------
# SAM embeddings for CVAT's stock browser plugin

#: A SAM with the official 256-channel embedding and a tiny encoder/decoder.
EMBED_SAM = {
    "encoder_embed_dim": 32,
    "encoder_depth": 1,
    "encoder_num_heads": 1,
    "encoder_global_attn_indexes": (),
    "prompt_embed_dim": 256,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


@pytest.fixture(scope="module")
def embed_sam_checkpoint(tmp_path_factory):
    import torch

    from backends.models.sam.loader import build_sam_model

    torch.manual_seed(1)
    model = build_sam_model(EMBED_SAM)
    path = tmp_path_factory.mktemp("sam256") / "embed_sam.pth"
    torch.save(model.state_dict(), path)
    return path


def _embedding_fn(checkpoint, architecture):
    env = function_env("sam-embedding") | {
        "SAM_CHECKPOINT": str(checkpoint),
        "TAPMASK_MODEL_OPTIONS": json.dumps({"architecture": architecture}),
    }
    return NuclioFunction(env)


def test_embedding_function_answers_the_sam_predictor_embedding_once_per_frame(
    embed_sam_checkpoint, flower
):
    import torch
    from segment_anything import SamPredictor

    from backends.models.sam.loader import build_sam_model

    fn = _embedding_fn(embed_sam_checkpoint, EMBED_SAM)
    data = image_variant(flower, "png")
    # The plugin's request carries the clicks too; embedding mode ignores them.
    blob = decode_blob(fn.call(cvat_payload(data, [flower.click], [], [])))

    model = build_sam_model(EMBED_SAM)
    model.load_state_dict(torch.load(embed_sam_checkpoint, weights_only=True))
    predictor = SamPredictor(model)
    predictor.set_image(images.decode(data))
    expected = predictor.get_image_embedding().numpy()
    np.testing.assert_allclose(blob, expected, rtol=0, atol=1e-6)

    segmenter = fn.engine.model(fn.user_data.settings.model)
    assert fn.user_data.settings.mode == MODE_EMBEDDING and segmenter.autocast is False
    again = decode_blob(fn.call(cvat_payload(data, [], [], None)))
    np.testing.assert_array_equal(again, blob)
    assert fn.engine.stats.encodes == 1 and segmenter.encode_calls == 1  # a cache hit

    check_error_reply(fn.call(cvat_payload(b"not an image", [flower.click])), 400)
    other = decode_blob(fn.call(cvat_payload(image_variant(flower, "gray"))))
    assert fn.engine.stats.encodes == 2 and not np.array_equal(other, blob)


def test_embedding_mode_refuses_an_embedding_the_plugin_cannot_decode(tiny_sam_checkpoint, flower):
    fn = _embedding_fn(tiny_sam_checkpoint, TINY_SAM)  # 32 channels, not 256
    body = check_error_reply(fn.call(cvat_payload(flower.file)), 500)
    assert body["error"] == "bad_embedding" and "256" in body["detail"]


# --------------------------------------------------------------------------------------------
# Settings


def test_settings_from_env():
    settings = settings_from_env({})
    assert (settings.model, settings.mode, dict(settings.options)) == ("grabcut", MODE_DECODE, {})
    settings = settings_from_env({"TAPMASK_CVAT_MODE": "Embedding"})
    assert settings.model == "sam-vit_h" and settings.options == {"autocast": False}
    settings = settings_from_env(
        {
            "TAPMASK_MODEL": "ritm-h18",
            "TAPMASK_DEVICE": "cuda:1",
            "TAPMASK_MODEL_OPTIONS": '{"max_size": 800}',
        }
    )
    assert settings.model == "ritm-h18"
    assert settings.options == {"max_size": 800, "device": "cuda:1"}
    settings = settings_from_env({"TAPMASK_CVAT_MODE": "detector", "TAPMASK_PLUGINS": "a, b"})
    assert (settings.model, settings.detector) == ("grabcut", "grounding-dino-tiny")
    assert settings.plugins == ("a", "b")
    assert settings_from_env({}).detector is None
    for bad in (
        {"TAPMASK_CVAT_MODE": "tracker"},
        {"TAPMASK_MODEL_OPTIONS": "{nope"},
        {"TAPMASK_MODEL_OPTIONS": "[1, 2]"},
    ):
        with pytest.raises(ModelLoadError):
            settings_from_env(bad)


def test_handler_never_raises_even_without_init_context():
    class Logger:
        def __init__(self):
            self.errors = []

        def error_with(self, message, **fields):
            self.errors.append((message, fields))

    class Context:
        user_data = type("UserData", (), {})()
        logger = Logger()

        @staticmethod
        def Response(**kwargs):  # nuclio's spelling
            return kwargs

    response = handler(Context(), nuclio_event({"image": "x"}))
    assert response["status_code"] == 500 and response["content_type"] == "application/json"
    assert json.loads(response["body"])["error"] == "internal_error"
    assert Context.logger.errors


# --------------------------------------------------------------------------------------------
# formats: parsing


def test_request_data_accepts_dicts_bytes_and_text():
    assert formats.request_data({"a": 1}) == {"a": 1}
    assert formats.request_data(b'{"a": 1}') == {"a": 1}
    assert formats.request_data(bytearray(b'{"a": 1}')) == {"a": 1}
    assert formats.request_data('{"a": 1}') == {"a": 1}
    for bad in (b"", b"   ", None, b"{", b"\xff\xfe", b"[]", b'"text"', 42):
        with pytest.raises(formats.BadRequest):
            formats.request_data(bad)


def test_decode_image_accepts_plain_wrapped_and_data_url_base64():
    data = bytes(range(256)) * 3
    text = base64.b64encode(data).decode()
    assert formats.decode_image(text) == data
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert formats.decode_image(wrapped) == data
    assert formats.decode_image("data:image/png;base64," + text) == data
    with pytest.raises(formats.BadRequest):
        formats.decode_image(None)
    with pytest.raises(formats.BadRequest):
        formats.decode_image(["abc"])
    for bad in ("", "abc", "a*bc", "Zm9v!"):
        with pytest.raises(formats.ImageError):
            formats.decode_image(bad)


def test_parse_box_variants():
    assert formats.parse_box([]) is None and formats.parse_box(None) is None
    assert formats.parse_box([[1, 2], [30.5, 40]]) == Box(1, 2, 30.5, 40)
    assert formats.parse_box([[30.5, 40], [1, 2]]) == Box(1, 2, 30.5, 40)
    assert formats.parse_box([1, 40, 30.5, 2]) == Box(1, 2, 30.5, 40)
    for bad in ([[1, 2]], [1, 2, 3], [[1, 2], [3]], "1,2,3,4", [[1, 2], [math.inf, 4]], {}):
        with pytest.raises(PromptError):
            formats.parse_box(bad)


def test_parse_points_and_threshold():
    clicks = formats.parse_points([[1, 2.5], (3.25, 4)], "pos_points", True)
    assert clicks == (Click(1, 2.5, True), Click(3.25, 4, True))
    assert formats.parse_points(None, "neg_points", False) == ()
    for bad in ([[1]], [[1, None]], [["1", 2]], [[False, 2]], [[math.nan, 2]], "12", {"x": 1}):
        with pytest.raises(PromptError):
            formats.parse_points(bad, "pos_points", True)
    assert formats.parse_threshold(None) is None and formats.parse_threshold(0) == 0.0
    assert formats.parse_threshold(0.49) == 0.49
    for bad in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(formats.BadRequest):
            formats.parse_threshold(bad)


def test_parse_interactor_request():
    request = formats.parse_interactor_request(
        {
            "image": base64.b64encode(b"img").decode(),
            "pos_points": [[1.5, 2]],
            "neg_points": [[3, 4]],
            "obj_bbox": [],
            "threshold": 0.5,
        }
    )
    assert request.image == b"img" and request.box is None and request.threshold == 0.5
    assert request.positives == (Click(1.5, 2, True),)
    assert request.negatives == (Click(3, 4, False),)
    with pytest.raises(formats.BadRequest, match="missing 'image'"):
        formats.parse_interactor_request({})  # no image reported before no clicks


# --------------------------------------------------------------------------------------------
# formats: click order


def _p(x, y):
    return Click(x, y, True)


def _n(x, y):
    return Click(x, y, False)


def test_order_clicks_follows_the_annotator():
    p1, p2, p3, n1, n2 = _p(1, 1), _p(2, 2), _p(3, 3), _n(10, 10), _n(20, 20)
    order = formats.order_clicks
    assert order((), [p1, p2], [n1]) == (p1, p2, n1)  # no history: positives, then negatives
    assert order((p1,), [p1], [n1]) == (p1, n1)
    assert order((p1, n1), [p1, p2], [n1]) == (p1, n1, p2)  # a positive after a negative
    assert order((p1, n1, p2), [p1, p2], [n1, n2]) == (p1, n1, p2, n2)
    assert order((p1, n1, p2, n2), [p1, p2], [n2]) == (p1, p2, n2)  # a click removed
    assert order((p1, n1, p2), [p1], [n1]) == (p1, n1)  # undo: a prefix, cached
    assert order((p1, n1), [p3], []) == (p3,)  # another object
    assert order((p1, p1), [p1, p1, p1], []) == (p1, p1, p1)  # duplicates match one to one
    # float noise below Click.key()'s rounding still matches; the current coordinates win
    nudged = _p(1.0000001, 1)
    assert order((p1, n1), [nudged, p2], [n1]) == (nudged, n1, p2)


def test_click_order_memory_is_per_image_and_bounded():
    memory = formats.ClickOrder(capacity=2)
    p1, p2, n1 = _p(1, 1), _p(2, 2), _n(10, 10)
    assert memory.order("a", [p1], [n1]) == (p1, n1)
    assert memory.order("b", [p1, p2], [n1]) == (p1, p2, n1)  # image b has no history
    assert memory.order("a", [p1, p2], [n1]) == (p1, n1, p2)
    memory.order("c", [p1], [])
    memory.order("d", [p1], [])
    assert len(memory) == 2
    assert memory.order("a", [p1, p2], [n1]) == (p1, p2, n1)  # evicted: default order
    request = formats.InteractorRequest(b"x", (p1,), (n1,), Box(0, 0, 5, 5))
    prompt = memory.prompt("e", request)
    assert prompt.clicks == (p1, n1) and prompt.box == Box(0, 0, 5, 5)


# --------------------------------------------------------------------------------------------
# formats: replies


def test_mask_reply_crops_and_outlines():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:30] = True
    mask[12, 40] = True  # a stray pixel widens the box but is no polygon
    body = json.loads(formats.mask_reply(Segmentation(mask, 0.9, "m")))
    assert body["bounds"] == [5, 10, 40, 19]
    crop = np.asarray(body["mask"])
    assert crop.shape == (10, 36) and set(np.unique(crop)) == {0, 1}
    np.testing.assert_array_equal(crop > 0, mask[10:20, 5:41])
    assert sorted(map(tuple, body["points"])) == [(5, 10), (5, 19), (29, 10), (29, 19)]

    line = np.zeros((40, 50), bool)
    line[5, 3:20] = True  # one pixel thin: no polygon, the UI traces the mask itself
    body = json.loads(formats.mask_reply(Segmentation(line, 0.9)))
    assert set(body) == {"mask", "bounds"} and body["bounds"] == [3, 5, 19, 5]

    with pytest.raises(EmptyMask) as info:
        formats.mask_reply(Segmentation(np.zeros((4, 4), bool), 0.1, "m"))
    assert info.value.status == 422


def test_embedding_reply_is_little_endian_float32():
    array = np.random.default_rng(0).standard_normal(formats.SAM_EMBEDDING_SHAPE)
    body = json.loads(formats.embedding_reply(array.astype(">f8")))
    decoded = np.frombuffer(base64.b64decode(body["blob"]), "<f4").reshape(array.shape)
    np.testing.assert_array_equal(decoded, array.astype(np.float32))
    with pytest.raises(formats.BadEmbedding):
        formats.embedding_reply(np.zeros((1, 32, 64, 64), np.float32))


def test_error_reply():
    status, body = formats.error_reply(PromptError("bad click"))
    assert status == 400 and json.loads(body) == {"error": "bad_prompt", "detail": "bad click"}
    status, body = formats.error_reply(KeyError("x"))
    assert status == 500 and json.loads(body)["error"] == "internal_error"
