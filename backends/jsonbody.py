"""Request bodies → JSON, with the bounds a hostile body would otherwise dodge.

``json.loads`` alone answers a 100,000-deep ``[[[…]]]`` with ``RecursionError`` and a
5,000-digit integer with a ``ValueError`` after quadratic work, and accepts every depth and
length below those. :func:`loads` scans the bytes first (a few C passes: strings removed, then
brackets counted and digit runs searched), so both bounds hold before anything is parsed:

* nesting deeper than ``TAPMASK_MAX_JSON_DEPTH`` → ``JsonTooDeep`` (413 ``json_too_deep``);
* a number with more than ``TAPMASK_MAX_NUMBER_DIGITS`` digits → ``NumberTooLong`` (413
  ``number_too_long``);
* anything else that is not JSON → ``BadRequest`` (400 ``bad_request``).

``NaN`` and ``Infinity`` literals parse (Python's and Label Studio's own JSON writers emit
them): each field that needs a number refuses a non-finite one where it is read.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from backends.errors import BadRequest, JsonTooDeep, NumberTooLong
from backends.settings import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_OPENERS = (ord("["), ord("{"))
_CHUNK = 1 << 20


def nesting_depth(brackets: bytes) -> int:
    """Deepest nesting of a string of ``[]{}`` only (chunked: memory stays small)."""
    codes = np.frombuffer(brackets, dtype=np.uint8)
    deepest, level = 0, 0
    for start in range(0, len(codes), _CHUNK):
        chunk = codes[start : start + _CHUNK]
        steps = np.where((chunk == _OPENERS[0]) | (chunk == _OPENERS[1]), 1, -1)
        levels = np.cumsum(steps, dtype=np.int64) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def check_text(raw: bytes, what: str = "request body") -> None:
    """Refuse ``raw`` if, read as JSON, it nests too deep or holds too long a number."""
    outside_strings = _STRING.sub(b"", raw)
    digits = int(MAX_NUMBER_DIGITS)
    if outside_strings.translate(_DIGITS_AS_ZERO).find(b"0" * (digits + 1)) >= 0:
        raise NumberTooLong(
            f"{what} holds a number with more than {digits} digits (TAPMASK_MAX_NUMBER_DIGITS)"
        )
    limit = int(MAX_JSON_DEPTH)
    depth = nesting_depth(outside_strings.translate(None, _NOT_BRACKETS))
    if depth > limit:
        raise JsonTooDeep(
            f"{what} nests {depth} levels deep; at most {limit} (TAPMASK_MAX_JSON_DEPTH)"
        )


def loads(raw: bytes | str, what: str = "request body") -> Any:
    """Parse a request body within the bounds above; every failure is a 4xx ``TapmaskError``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    check_text(raw, what)
    try:
        return json.loads(raw)
    except RecursionError:  # unreachable after check_text; kept as the last line of defence
        raise JsonTooDeep(f"{what} nests too deep (TAPMASK_MAX_JSON_DEPTH)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


def check_depth(value: Any, what: str = "request body") -> None:
    """The depth bound for a body something else already parsed (nuclio parses
    ``application/json`` bodies itself). Walks containers only, without recursion."""
    if not isinstance(value, (dict, list)):
        return
    limit = int(MAX_JSON_DEPTH)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise JsonTooDeep(
                f"{what} nests more than {limit} levels deep (TAPMASK_MAX_JSON_DEPTH)"
            )
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
