"""Parsers of the policy's scalar values: durations, sizes, URLs, header names.

Each raises ``ValueError`` with a one-line message (the loader turns it into a
``file:line: field: message`` problem) and never echoes credentials back.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d{1,15})\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9,
               "gib": 2**30, None: 1}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110)

MAX_DURATION = 30 * 24 * 3600.0   # 720h: anything longer is a typo (or never ends)
MAX_SIZE = 2**30                  # 1 GiB: bodies and events are held in memory


def parse_duration(value: Any) -> float:
    """``300s``, ``5m``, ``250ms``, ``2h`` or a number of seconds -> seconds, in
    (0, 720h]."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r} (expected e.g. 300s, 5m, 250ms)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {_short(value)} (expected e.g. 300s, 5m, "
                             "250ms)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {_short(value)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most 720h, got {_short(value)}")
    return seconds


def parse_size(value: Any) -> int:
    """``16MiB``, ``64kb``, ``65536`` -> bytes, in [1, 1 GiB]."""
    match = None if isinstance(value, bool | float) else _SIZE.match(str(value))
    if not match:
        raise ValueError(f"invalid size {_short(value)} (expected e.g. 16MiB, 65536)")
    unit = match.group(2).lower() if match.group(2) else None
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError(f"must be a positive size, got {_short(value)}")
    if size > MAX_SIZE:
        raise ValueError(f"must be at most 1GiB, got {_short(value)}")
    return size


def redact_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``: for messages and logs.

    Cuts up to the last ``@`` anywhere, so that even a malformed URL never shows a
    password (a valid URL with ``@`` in its path loses a little more than needed)."""
    at = text.rfind("@")
    if at < 0:
        return text
    start = text.find("://")
    start = start + 3 if 0 <= start < at else 0
    return text[:start] + "***" + text[at:]


def has_credentials(url: str) -> bool:
    """Whether a (valid) URL carries ``user[:password]@``."""
    return "@" in urlsplit(url).netloc


def parse_url(value: Any) -> str:
    """An http(s) base URL with a host and no query or fragment, without its
    trailing slash: request paths are appended to it."""
    if not isinstance(value, str):
        raise ValueError(f"must be an http:// or https:// URL, got {type(value).__name__}")
    shown = _short(redact_url(value))
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:
        raise ValueError(f"not a valid URL: {shown}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
            c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"must be an http:// or https:// URL, got {shown}")
    if port == 0:
        raise ValueError(f"port 0 in {shown}")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"a base URL takes no ?query or #fragment, got {shown}")
    return value.rstrip("/")


def header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"not a valid HTTP header name: {_short(name)}")
    return name


def header_value(value: str) -> str:
    if not value.isascii() or any(not c.isprintable() and c != "\t" for c in value):
        raise ValueError("a header value must be printable ASCII (no line breaks)")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str | int | float) else repr(str(value))
    return text if len(text) <= limit else text[:limit] + "…'"
