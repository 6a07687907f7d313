"""CVAT's interactor wire format: parse and validate requests, build replies.

Everything here is pure (no nuclio, no models), so the handler stays parse → dispatch → format.
See ``shared/protocols/cvat.md`` for what CVAT sends and what its UI accepts.

Requests (``POST`` from CVAT's lambda manager, JSON)::

    {"image": "<base64 of the original file>", "pos_points": [[x, y], ...],
     "neg_points": [[x, y], ...], "obj_bbox": [] | null | [[x1, y1], [x2, y2]],
     "threshold": 0.5}                                   # threshold: API callers only

Replies: ``{"mask": <crop rows, 0/1>, "bounds": [x1, y1, x2, y2], "points": [[x, y], ...]}``
(bounds inclusive, points = the largest polygon in absolute pixels) in decode mode, and
``{"blob": <base64 little-endian float32 [1, 256, 64, 64]>}`` in embedding mode (the stock CVAT SAM
browser plugin). Errors: ``{"error": <code>, "detail": <text>}`` under the error's HTTP status.

Click order. CVAT sends positives and negatives as two lists, so the order the annotator clicked
in is lost, yet SAM and RITM refine click by click and the Engine caches a state per click prefix.
:class:`ClickOrder` recovers the order from the previous request for the same image: clicks still
present keep their earlier order and clicks that are new are appended (positives, then
negatives, each in list order). CVAT resends every click on every request and a click only ever
adds one point, so this reproduces the annotator's real order, and each request extends the
previous one by one click: the Engine then decodes that one click from the cached state instead
of replaying the history. With no usable history (first request for an image in this worker, a
new object, a restarted worker) the order is simply positives then negatives, as CVAT's own HRNet
function orders them. A removed click just drops out of the remembered order (the Engine resumes
from the longest cached prefix). The price: two workers that saw different histories may order
the same request differently, and SAM/RITM answers depend on click order; it is deliberate, since
the remembered order is the one the annotator actually used.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import jsonbody
from backends.errors import (
    BadEmbedding,
    BadRequest,
    EmptyMask,
    ImageError,
    ImageTooLarge,
    PromptError,
    RequestTooLarge,
    TapmaskError,
    TooManyClicks,
)
from backends.masks import largest_polygon, mask_bbox, mask_to_cvat_crop_json
from backends.prompts import Box, Click, Prompt, Segmentation, finite_number, short_repr
from backends.settings import MAX_CLICKS, MAX_IMAGE_MB, MAX_REQUEST_MB, max_bytes

#: The embedding the stock CVAT SAM plugin decodes: ``SamPredictor.get_image_embedding()`` of a
#: ViT-H model, float32, 4 MiB.
SAM_EMBEDDING_SHAPE = (1, 256, 64, 64)

_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class InteractorRequest:
    """One parsed interactor request: image file bytes and the prompt as CVAT sent it."""

    image: bytes
    positives: tuple[Click, ...] = ()
    negatives: tuple[Click, ...] = ()
    box: Box | None = None
    threshold: float | None = None


# --------------------------------------------------------------------------------------------
# Requests


def request_data(body: Any) -> dict[str, Any]:
    """``event.body`` as a dict: nuclio hands over a dict only for ``Content-Type`` exactly
    ``application/json``, raw bytes otherwise (``; charset=utf-8`` included).

    Bytes are parsed within the body limits (``TAPMASK_MAX_REQUEST_MB``, nesting, digits; see
    ``backends.jsonbody``); a dict nuclio already parsed gets the nesting bound too.
    """
    if isinstance(body, Mapping):
        data = dict(body)
        jsonbody.check_depth(data)
        return data
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
    elif isinstance(body, str):
        raw = body.encode("utf-8", "surrogatepass")
    elif body is None:
        raw = b""
    else:
        raise BadRequest(f"unsupported request body of type {type(body).__name__}")
    limit = max_bytes(MAX_REQUEST_MB)
    if len(raw) > limit:
        raise RequestTooLarge(
            f"request body of {len(raw)} bytes is over the {limit}-byte limit "
            "(TAPMASK_MAX_REQUEST_MB)"
        )
    if not raw.strip():
        raise BadRequest("empty request body: expected a JSON object")
    data = jsonbody.loads(raw)
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def decode_image(value: Any) -> bytes:
    """The ``image`` field: base64 of the image file (a ``data:`` URL prefix is tolerated)."""
    if value is None:
        raise BadRequest("missing 'image': expected the base64 of the image file")
    if not isinstance(value, str):
        raise BadRequest(f"'image' must be a base64 string, got {type(value).__name__}")
    limit = max_bytes(MAX_IMAGE_MB)
    if len(value) > limit // 3 * 4 + 4096:  # base64 is 4/3 of the file, plus slack for a prefix
        raise ImageTooLarge(
            f"'image' is {len(value)} base64 characters, over the {limit}-byte image limit "
            "(TAPMASK_MAX_IMAGE_MB)"
        )
    text = _WHITESPACE.sub("", _DATA_URL.sub("", value, count=1))
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"'image' is not valid base64: {exc}") from None
    if not data:
        raise ImageError("'image' is empty")
    if len(data) > limit:
        raise ImageTooLarge(
            f"'image' is {len(data)} bytes, over the {limit}-byte limit (TAPMASK_MAX_IMAGE_MB)"
        )
    return data


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PromptError(f"{what}: expected [x, y], got {short_repr(value)}")
    return finite_number(value[0], what), finite_number(value[1], what)


def check_click_count(*lists: Any) -> None:
    """``TAPMASK_MAX_CLICKS`` over all point lists together, before any point is parsed."""
    count = sum(len(v) for v in lists if isinstance(v, (list, tuple)))
    limit = int(MAX_CLICKS)
    if count > limit:
        raise TooManyClicks(
            f"{count} points (pos_points + neg_points); at most {limit} (TAPMASK_MAX_CLICKS)"
        )


def parse_points(value: Any, what: str, positive: bool) -> tuple[Click, ...]:
    """``pos_points`` / ``neg_points``: ``[[x, y], ...]`` in image pixels (floats)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'{what}' must be a list of [x, y] points, got {type(value).__name__}")
    check_click_count(value)
    return tuple(
        Click(*_pair(point, f"{what}[{index}]"), positive) for index, point in enumerate(value)
    )


def parse_box(value: Any) -> Box | None:
    """``obj_bbox``: ``[]`` or ``null`` (no box), ``[[x1, y1], [x2, y2]]`` (CVAT) or
    ``[x1, y1, x2, y2]`` (API callers). Corners may come in any order (a box dragged up-left)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'obj_bbox' must be [[x1, y1], [x2, y2]], got {short_repr(value)}")
    if len(value) == 2:
        (xa, ya), (xb, yb) = _pair(value[0], "obj_bbox"), _pair(value[1], "obj_bbox")
    elif len(value) == 4:
        xa, ya, xb, yb = (finite_number(v, "obj_bbox") for v in value)
    else:
        raise PromptError(f"'obj_bbox' must be [[x1, y1], [x2, y2]], got {short_repr(value)}")
    return Box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))


def parse_threshold(value: Any) -> float | None:
    """Optional ``threshold`` in [0, 1] (sent by API callers only; validated, see the handler)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'threshold' must be a number in [0, 1], got {short_repr(value)}")
    if not 0.0 <= value <= 1.0:  # NaN fails too; a huge int compares without overflowing
        raise BadRequest(f"'threshold' must be a number in [0, 1], got {short_repr(value)}")
    return float(value)


def parse_interactor_request(data: Mapping[str, Any]) -> InteractorRequest:
    """Validate a decoded request body. The image is only base64-decoded here; decoding the
    picture (and its pixel limit, 413) happens once per image in the Engine's image cache."""
    image = data.get("image")
    if not isinstance(image, str):
        decode_image(image)  # raises the right error for a missing or non-string image
    # Cheap field checks before the base64 decode, which can be tens of megabytes.
    check_click_count(data.get("pos_points"), data.get("neg_points"))
    positives = parse_points(data.get("pos_points"), "pos_points", True)
    negatives = parse_points(data.get("neg_points"), "neg_points", False)
    box = parse_box(data.get("obj_bbox"))
    threshold = parse_threshold(data.get("threshold"))
    if not positives and not negatives and box is None:
        raise PromptError("no clicks and no box: send pos_points, neg_points or obj_bbox")
    return InteractorRequest(decode_image(image), positives, negatives, box, threshold)


def parse_embedding_request(data: Mapping[str, Any]) -> bytes:
    """Embedding mode needs the image only; the stock plugin's points are ignored."""
    return decode_image(data.get("image"))


# --------------------------------------------------------------------------------------------
# Click order


def order_clicks(
    previous: Sequence[Click], positives: Sequence[Click], negatives: Sequence[Click]
) -> tuple[Click, ...]:
    """The clicks of a request in click order, given the order of the previous request.

    Clicks of ``previous`` still present keep their order (equal clicks are matched one to one
    by ``Click.key()``); the rest follow, positives before negatives, each in list order.
    """
    current = [*positives, *negatives]
    pool: dict[tuple[float, float, bool], deque[int]] = {}
    for index, click in enumerate(current):
        pool.setdefault(click.key(), deque()).append(index)
    taken: list[int] = []
    for click in previous:
        indices = pool.get(click.key())
        if indices:
            taken.append(indices.popleft())
    used = set(taken)
    rest = [index for index in range(len(current)) if index not in used]
    return tuple(current[index] for index in (*taken, *rest))


class ClickOrder:
    """Per-image memory of the last click order (see the module docstring), LRU-bounded.

    One instance per worker process: nuclio workers are processes, so the memory is as local as
    the Engine's caches it feeds. Thread-safe for the dispatcher's sake.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = int(capacity)
        self._last: OrderedDict[str, tuple[Click, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._last)

    def order(
        self, image_key: str, positives: Iterable[Click], negatives: Iterable[Click]
    ) -> tuple[Click, ...]:
        with self._lock:
            previous = self._last.get(image_key, ())
            ordered = order_clicks(previous, tuple(positives), tuple(negatives))
            self._last[image_key] = ordered
            self._last.move_to_end(image_key)
            while len(self._last) > self.capacity:
                self._last.popitem(last=False)
        return ordered

    def prompt(self, image_key: str, request: InteractorRequest) -> Prompt:
        """The request as a ``Prompt`` with its clicks in (recovered) click order."""
        return Prompt(self.order(image_key, request.positives, request.negatives), request.box)


# --------------------------------------------------------------------------------------------
# Replies


def dumps(payload: Any) -> str:
    """Compact JSON (no spaces): replies can be megabytes of digits."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def mask_reply(segmentation: Segmentation) -> str:
    """``{"mask", "bounds", "points"}`` JSON for CVAT's UI; ``EmptyMask`` (422) when empty.

    The mask is the crop of the inclusive bounding box, never the whole frame. ``points`` is
    the largest outer polygon in absolute pixels (vertices are pixel centres), left out when
    the object is too thin to have one (the UI then traces the mask itself).
    """
    mask = np.asarray(segmentation.mask, dtype=bool)
    if mask_bbox(mask) is None:
        raise EmptyMask(
            f"{segmentation.model or 'the model'} found no object for these clicks; "
            "add a positive click on the object"
        )
    polygon = largest_polygon(mask)
    points = [[round(x), round(y)] for x, y in polygon] if polygon else None
    return mask_to_cvat_crop_json(mask, **({"points": points} if points else {}))


def embedding_reply(embedding: Any) -> str:
    """``{"blob": base64(float32 little-endian [1, 256, 64, 64])}`` for the stock SAM plugin."""
    array = np.asarray(embedding)
    if array.shape != SAM_EMBEDDING_SHAPE:
        raise BadEmbedding(
            f"the stock CVAT SAM plugin needs a {list(SAM_EMBEDDING_SHAPE)} image embedding "
            f"(SAM ViT-H); this model gives {list(array.shape)}: serve it in decode mode"
        )
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return '{"blob":"' + base64.b64encode(data).decode("ascii") + '"}'


def error_reply(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, JSON body) for any exception: ``TapmaskError``s keep their status."""
    if isinstance(exc, TapmaskError):
        return exc.status, dumps(exc.to_dict())
    return 500, dumps({"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"})
