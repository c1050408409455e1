"""Transport failures -> guardproxy's error tree, with messages that never name the upstream.

httpx-aiohttp maps only some aiohttp errors to httpx's (and maps a refused or dropped
connection to ``ConnectTimeout``); parse errors (``BadStatusLine``, ``LineTooLong``),
``ClientOSError``, bare ``TimeoutError`` / ``OSError`` escape as they are. So the cause
chain decides: the lowest-level error found in it says what happened, and httpx's own
class is used only when there is nothing below it (other transports, ``MockTransport``).

The client only ever reads a generic message; the details (which name the upstream's
host and port, and could name credentials) go to the log, redacted by ``redact``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator

import aiohttp
import httpx
from aiohttp import http_exceptions

from guardproxy.errors import UpstreamError, UpstreamInterrupted, UpstreamTimeout
from guardproxy.upstream.encoding import DecodingError

UNREACHABLE = "upstream unreachable"
TIMEOUT = "upstream did not answer in time"
CLOSED = "upstream closed the connection before the response was complete"
INVALID = "upstream sent an invalid response"
FAILED = "upstream failed"
MID_CLOSED = "upstream closed the connection mid-response"
MID_TIMEOUT = "upstream stopped sending mid-response (timeout)"
MID_INVALID = "upstream sent an invalid response body"

# aiohttp's writer raises this, with this text, when the connection is already closing
# before a write: the one failure that proves the request never left (see never_sent).
_CLOSING_WRITE = "Cannot write to closing transport"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (explicit first, else implicit), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _category(exc: BaseException) -> str:
    """"unreachable" | "timeout" | "closed" | "invalid" | "failed"."""
    below_httpx = [e for e in chain(exc) if not isinstance(e, httpx.HTTPError)]
    for e in below_httpx:  # outermost first: aiohttp's own class before the OSError under it
        if isinstance(e, aiohttp.ServerTimeoutError | TimeoutError):
            return "timeout"
        if isinstance(e, aiohttp.ClientConnectorError | aiohttp.InvalidURL):
            return "unreachable"
        if isinstance(e, aiohttp.ClientResponseError | http_exceptions.HttpProcessingError
                      | DecodingError | zlib.error):
            return "invalid"
        if isinstance(e, aiohttp.ClientPayloadError):
            # "payload not completed" (closed or reset mid-body) vs. a malformed body
            return "closed" if _truncated(e) else "invalid"
        if isinstance(e, aiohttp.ClientError | ConnectionError | OSError):
            return "closed"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol):
        return "unreachable"
    if isinstance(exc, httpx.DecodingError):
        return "invalid"
    if isinstance(exc, httpx.TransportError):
        return "closed"
    return "failed"


def _truncated(exc: aiohttp.ClientPayloadError) -> bool:
    return any(isinstance(e, http_exceptions.ContentLengthError
                          | http_exceptions.TransferEncodingError | ConnectionError)
               or "not completed" in str(e) for e in chain(exc))


def before_response(exc: BaseException) -> UpstreamError:
    """The error to raise for a failure before ``http.response.start`` was sent."""
    category = _category(exc)
    if category == "timeout":
        return UpstreamTimeout(TIMEOUT)
    return UpstreamError({"unreachable": UNREACHABLE, "closed": CLOSED,
                          "invalid": INVALID}.get(category, FAILED))


def mid_response(exc: BaseException) -> UpstreamInterrupted:
    """The error to raise for a failure after ``http.response.start`` was sent."""
    category = _category(exc)
    return UpstreamInterrupted({"timeout": MID_TIMEOUT, "invalid": MID_INVALID}
                               .get(category, MID_CLOSED))


def known(exc: BaseException) -> bool:
    """True for a failure of the upstream or the network; False suggests a bug here."""
    return _category(exc) != "failed"


def never_sent(exc: BaseException) -> bool:
    """True only when the request certainly did not reach the upstream: aiohttp found the
    pooled connection already closing at the first write. With a bytes body (or none)
    the head and body go out in that one write (aiohttp coalesces them), so nothing was
    sent. A reset or EOF after a write that succeeded proves nothing (the upstream may
    have read the request and crashed), and is never retried."""
    return any(isinstance(e, aiohttp.ClientConnectionResetError)
               and str(e).startswith(_CLOSING_WRITE) for e in chain(exc))


def describe(exc: BaseException, secrets: Iterable[str]) -> str:
    """The cause chain as one log line, credentials redacted."""
    text = " <- ".join(f"{type(e).__module__}.{type(e).__qualname__}: {e}"
                       for e in chain(exc))
    return redact(text, secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` without URL userinfo (``scheme://user:pass@`` -> ``scheme://***@``) and
    without any of ``secrets`` (configured header values, URL credentials)."""
    text = _USERINFO.sub(r"\1***@", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # a short value would blank out ordinary words
            text = text.replace(secret, "***")
    return text
