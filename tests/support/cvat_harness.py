"""Drive tapmask's nuclio handler the way CVAT and nuclio do, and check replies like CVAT's UI.

* requests are built like CVAT's lambda manager: base64 of the original file bytes, float points,
  ``obj_bbox`` as ``[]``, ``null`` or ``[[x1, y1], [x2, y2]]``, posted as ``application/json``;
* events are decoded like nuclio's Python wrapper: the body is a dict only for a Content-Type of
  exactly ``application/json``, bytes otherwise;
* the handler runs under ``nuclio_sdk.test.Platform`` (``init_context`` once per platform), and the
  returned response goes through nuclio's own ``Response.from_entrypoint_output``;
* replies are checked as CVAT's UI reads them (2-D 0/1 crop matching the inclusive bounds,
  polygon inside the frame) or, for the SAM plugin, as a float32 ``[1, 256, 64, 64]`` blob.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import yaml
from nuclio_sdk import Event, Response
from nuclio_sdk.test import Platform

from backends.cvat import handler as cvat_handler

SERVERLESS = Path(__file__).resolve().parents[2] / "serverless"

Point = Sequence[float]


def cvat_payload(
    image: bytes,
    pos_points: Sequence[Point] = (),
    neg_points: Sequence[Point] = (),
    obj_bbox: Any = (),
    **extra: Any,
) -> dict[str, Any]:
    """The JSON CVAT's lambda manager posts to an interactor."""
    return {
        "image": base64.b64encode(image).decode("utf-8"),
        "pos_points": [[float(x), float(y)] for x, y in pos_points],
        "neg_points": [[float(x), float(y)] for x, y in neg_points],
        "obj_bbox": list(obj_bbox) if isinstance(obj_bbox, (tuple, list)) else obj_bbox,
        **extra,
    }


def nuclio_event(payload: Any, content_type: str = "application/json") -> Event:
    """An event as nuclio's Python wrapper builds it from the HTTP request."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    if content_type == "application/json":
        # the wrapper's _try_deserialize_json: bytes stay bytes when they are not JSON
        with contextlib.suppress(Exception):
            body = json.loads(body.decode("utf-8"))
    return Event(body=body, content_type=content_type, method="POST", path="/")


def function_env(name: str, gpu: bool = False) -> dict[str, str]:
    """``spec.env`` of ``serverless/<name>/nuclio/function[-gpu].yaml``."""
    yaml_name = "function-gpu.yaml" if gpu else "function.yaml"
    config = yaml.safe_load((SERVERLESS / name / "nuclio" / yaml_name).read_text())
    return {item["name"]: str(item["value"]) for item in config["spec"].get("env", [])}


@dataclass
class Reply:
    status: int
    content_type: str
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


class NuclioFunction:
    """The shared handler under ``nuclio_sdk.test.Platform`` with a function's environment.

    ``init_context`` runs on the first call, with ``env`` (e.g. :func:`function_env` plus test
    overrides) applied on top of ``os.environ``.
    """

    def __init__(self, env: Mapping[str, str]):
        self.env = {key: str(value) for key, value in env.items()}
        self.platform = Platform()
        self.context: Any = None

    def _capture(self, context: Any) -> Any:
        self.context = context
        return context

    def call_event(self, event: Event) -> Reply:
        with mock.patch.dict(os.environ, self.env):
            response = self.platform.call_handler_with_context_mutation(
                cvat_handler.handler, event, self._capture
            )
        assert isinstance(response, Response), f"handler returned {response!r}"
        wire = Response.from_entrypoint_output(json.dumps, response)
        assert isinstance(wire["body"], str)
        return Reply(int(wire["status_code"]), wire["content_type"], wire["body"])

    def call(self, payload: Any, content_type: str = "application/json") -> Reply:
        return self.call_event(nuclio_event(payload, content_type))

    @property
    def user_data(self) -> Any:
        return self.context.user_data

    @property
    def engine(self) -> Any:
        return self.user_data.dispatcher.engine


def check_mask_reply(reply: Reply, width: int, height: int) -> np.ndarray:
    """Check a decode-mode reply the way CVAT's UI reads it; return the frame-sized mask."""
    assert reply.status == 200, reply.text[:500]
    assert reply.content_type == "application/json"
    body = reply.json
    assert isinstance(body, dict), "one object per reply, as a JSON object"
    mask, bounds = body["mask"], body["bounds"]
    assert isinstance(mask, list) and mask and all(isinstance(row, list) for row in mask)
    assert len({len(row) for row in mask}) == 1, "rows of equal length"
    values = {value for row in mask for value in row}
    assert values == {0, 1} or values == {1}, f"a binary 0/1 mask, got {sorted(values)[:5]}"
    assert len(bounds) == 4 and all(isinstance(v, int) for v in bounds)
    x1, y1, x2, y2 = bounds
    assert 0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height, (bounds, width, height)
    assert len(mask) == y2 - y1 + 1 and len(mask[0]) == x2 - x1 + 1, "crop matches bounds"
    crop = np.asarray(mask, dtype=np.uint8) > 0
    assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any(), (
        "bounds are tight"
    )
    if "points" in body:
        points = np.asarray(body["points"], dtype=float)
        assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
        assert (points[:, 0] >= 0).all() and (points[:, 0] <= width - 1).all()
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= height - 1).all()
        assert (points[:, 0] >= x1).all() and (points[:, 0] <= x2).all()
        assert (points[:, 1] >= y1).all() and (points[:, 1] <= y2).all()
    full = np.zeros((height, width), bool)
    full[y1 : y2 + 1, x1 : x2 + 1] = crop
    return full


def check_error_reply(reply: Reply, status: int | None = None) -> dict[str, Any]:
    assert 400 <= reply.status < 600, reply.status
    if status is not None:
        assert reply.status == status, (reply.status, reply.text)
    assert reply.content_type == "application/json"
    body = reply.json
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"], body
    return body


def decode_blob(reply: Reply) -> np.ndarray:
    """The SAM plugin's view of an embedding-mode reply: little-endian float32 [1,256,64,64]."""
    assert reply.status == 200, reply.text[:500]
    assert reply.content_type == "application/json"
    body = reply.json
    assert set(body) == {"blob"}
    data = base64.b64decode(body["blob"], validate=True)
    array = np.frombuffer(data, dtype="<f4")
    assert array.size == 1_048_576
    return array.reshape(1, 256, 64, 64)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` × ``height`` (a decompression-bomb probe)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def iou(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> float:
    if valid is None:
        valid = np.ones(a.shape, bool)
    union = ((a | b) & valid).sum()
    return float((a & b & valid).sum() / union) if union else 1.0
