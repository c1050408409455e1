"""Strict JSON for request bodies: one reading that no upstream can read differently.

Python's ``json`` (and many servers) accept what others reject or read otherwise:
duplicate keys (first wins in some parsers, last in others), ``NaN``/``Infinity``, a
byte-order mark, UTF-16/32. A body that any of these apply to is refused, so the proxy
and the upstream always see one request.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from guardproxy.errors import RequestError


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"Request body has a duplicate key {key!r}.")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise RequestError(f"Request body is not valid JSON: {name} is not a JSON number.")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: would be re-encoded as the non-JSON ``Infinity``
        raise RequestError(f"Request body has a number out of range: {text[:40]}.")
    return value


# built once: json.loads would build a decoder per call for these hooks
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                            parse_float=_finite)


MAX_DEPTH = 64   # deeper requests are refused: answers echo parts of them, deeper still
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]')


def _too_deep(text: str) -> bool:
    """Whether arrays/objects nest deeper than MAX_DEPTH (strings skipped). Only run when
    the text has enough brackets to possibly be that deep."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for match in _TOKENS.finditer(text):
        c = match.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def parse_json(body: bytes) -> Any:
    """The body's JSON value. Raises ``RequestError`` (400) for anything but strict
    UTF-8 JSON: invalid syntax, duplicate keys, NaN/Infinity, a BOM, nesting too deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("Request body is not valid UTF-8.") from None
    if _too_deep(text):
        raise RequestError(f"Request body is nested deeper than {MAX_DEPTH} levels.")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise RequestError("Request body is nested too deeply.") from None
    except ValueError as exc:
        raise RequestError(f"Request body is not valid JSON: {exc}") from None
