"""One path for guards and upstream alike.

A proxy that matches rules on the raw path while the upstream's HTTP client normalises
it (``/x/../v1/messages``, ``/v1/chat/completions/.``) lets a client walk around every
path-scoped rule: a parser differential, like request smuggling. So the path is
normalised once, before anything matches on it, and the normalised path is what is
forwarded. Forms that servers disagree on are refused rather than guessed.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

from guardproxy.errors import RequestError

# Encoded '.', '/', '\' and NUL: servers differ on whether they decode them before routing.
_AMBIGUOUS = re.compile(rb"%(?:2[eEfF]|5[cC]|00)")
_SAFE = "/:@!$&'()*+,;=-._~"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# already normal: segments of unreserved characters, none empty or starting with a dot
_PLAIN = re.compile(rb"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")


def normalize_path(raw_path: bytes) -> tuple[str, bytes]:
    """``raw_path`` (as received, percent-encoded, no query) -> (decoded path, raw path
    to forward). Dot segments are removed (RFC 3986 §5.2.4), empty segments and a
    trailing slash dropped.

    Raises ``RequestError`` (400) for a target that is not origin-form (``*``, an absolute
    URI), a ``..`` above the root, encoded dots, slashes, backslashes or NUL, a backslash,
    a control character, or bytes that are not UTF-8.
    """
    if _PLAIN.fullmatch(raw_path):  # the common case, with nothing to undo
        return raw_path.decode("ascii"), raw_path
    if not raw_path.startswith(b"/"):
        raise RequestError("Invalid request target: the path must start with '/'.")
    if b"\\" in raw_path or _AMBIGUOUS.search(raw_path):
        raise RequestError("Invalid request path: encoded '.', '/', '\\' or NUL, or a "
                           "backslash, is not accepted.")
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("Invalid request path: not UTF-8.") from None
    if _CONTROL.search(decoded):
        raise RequestError("Invalid request path: control characters.")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise RequestError("Invalid request path: '..' above the root.")
            segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    return path, quote(path, safe=_SAFE).encode("ascii")
