"""``UpstreamApp``: a pure ASGI app that forwards each request to the model API.

httpx is the HTTP API (requests, responses, timeouts, errors); the transport under it is
aiohttp's, chosen by measurement (httpcore's pool collapses under concurrency,
encode/httpx#3215; see bench/). ``UpstreamApp`` plays the client: it builds each request
and hands it straight to the transport, because a proxy needs none of ``AsyncClient``'s
per-response behaviour — no redirects, no auth flows, and above all no cookie jar shared
by every caller (httpx offers each response to its jar, and wrapping it for the jar alone
cost ~5% of a proxied request's CPU).

What it guarantees to the middleware around it:

* Every transport failure is translated here (``failures.py``): ``UpstreamError`` /
  ``UpstreamTimeout`` before ``http.response.start`` was sent, ``UpstreamInterrupted``
  after; never an aiohttp, OS or exception-group error. Messages are generic; details go
  to the ``guardproxy.upstream`` log with credentials redacted. A request target that is
  not origin-form raises ``RequestError`` (400) and is never glued onto the base URL.
* A request that certainly never reached the upstream (its pooled connection was found
  closing at the first write) is sent once more, if its body is replayable bytes.
* The client going away (``http.disconnect``) while the upstream is still to answer, or
  mid-body, cancels the upstream request and closes its connection; then nothing more
  is sent and nothing is raised.
* Bodies are relayed decoded (``encoding.py``, ``relay.py``); the upstream response is
  always closed in this module's own ``finally``.
* Credentials in the upstream URL (``http://user:pass@host``) become an
  ``Authorization: Basic`` header, so that no URL handed to the transport holds them;
  the client's credentials, cookies and hop-by-hop headers never go upstream, and the
  upstream's cookies, auth challenges and echoed credentials never come back
  (``headers.py``).
* A WebSocket is refused (the guards never see one): HTTP 501 where the server supports
  the ``websocket.http.response`` extension, else close code 1008 (the server answers 403).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from starlette.types import Receive, Scope, Send

from guardproxy.errors import RequestError, UpstreamError
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream.failures import (
    before_response,
    describe,
    known,
    mid_response,
    never_sent,
)
from guardproxy.upstream.headers import request_headers
from guardproxy.upstream.relay import Relay, Translate

log = logging.getLogger("guardproxy.upstream")
_CLOSE_TIMEOUT = 5.0  # seconds to wait for a closing upstream response, even when cancelled
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f#\\]")
_DOT_SEGMENTS = frozenset({b".", b"..", b"%2e", b".%2e", b"%2e.", b"%2e%2e"})
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_CREDENTIAL_WORDS = (b"auth", b"key", b"token", b"secret", b"password", b"cookie")
_WS_REFUSAL = b"WebSocket is not supported by this proxy.\n"


def make_transport() -> httpx.AsyncBaseTransport:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limits.max_connections or 0,
                                             keepalive_timeout=30)
            return aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar())

        return AiohttpTransport(limits=limits, client=session)
    except ImportError:  # pragma: no cover - httpx-aiohttp is a declared dependency
        return httpx.AsyncHTTPTransport(limits=limits)


class _ClientGone(Exception):
    """The client disconnected while its request body was still being sent upstream."""


@dataclass
class _Client:
    """What is known of the client during one exchange."""

    body_sent: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: bool = False
    cancelled: bool = False   # the exchange was cancelled because the client went away
    done: bool = False        # the exchange is closing: too late to cancel it


class UpstreamApp:
    def __init__(self, config: UpstreamConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.base, self.headers = _base_and_headers(config)
        self.timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout).as_dict()
        self.secrets = _secrets(config.url, self.headers)
        self._secret_bytes = tuple(s.encode("latin-1", "replace") for s in self.secrets)
        parts = urlsplit(self.base)  # no credentials here: they went into a header
        self.origin = f"{parts.scheme}://{parts.netloc}".lower().encode("latin-1", "replace") \
            if parts.netloc else b""
        self._transport = transport

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        if self._transport is None:
            self._transport = make_transport()
        return self._transport

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await _refuse_websocket(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        url = self.base + origin_target(scope)
        method: str = scope["method"]
        client = _Client()
        body = await _request_body(receive, client)
        if client.disconnected:
            return
        headers = request_headers(scope["headers"], self.headers)
        # for the log: the path only (a query string may carry a credential)
        translate = partial(self._translate, f"{method} {url[len(self.base):].split('?')[0]}")
        opened: list[httpx.Response] = []
        failure: Exception | None = None
        # a plain asyncio task, not an anyio task group: the group's cancel scopes cost
        # ~15% of a proxied request's CPU (py-spy, bench.overhead at 32 connections)
        this = asyncio.current_task()
        assert this is not None
        watcher = asyncio.get_running_loop().create_task(
            _watch_disconnect(receive, client, this))
        try:
            try:
                response = await self._open(method, url, headers, body, opened, client,
                                            translate)
                await Relay(response, method, send, translate, self._secret_bytes,
                            self.origin).run()
            except asyncio.CancelledError:
                # ours (the client left) is swallowed; any other (a shutdown, even in the
                # same tick) goes on up
                if not client.cancelled or this.uncancel() > 0:
                    raise
            except Exception as exc:
                failure = exc
        finally:
            client.done = True   # before any await: the watcher must not cancel the close
            watcher.cancel()
            if opened:
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await _close(opened[0])
                except TimeoutError:
                    log.warning("closing the upstream response took over %ss", _CLOSE_TIMEOUT)
        if failure is not None and not client.disconnected:
            raise failure

    async def _open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                    body: bytes | AsyncIterator[bytes], opened: list[httpx.Response],
                    client: _Client, translate: Translate) -> httpx.Response:
        """Send the request; the response once its head has arrived (also put in
        ``opened``, so that it is closed whatever happens next)."""
        for attempt in (1, 2):
            try:
                request = httpx.Request(method, url, headers=headers, content=body,
                                        extensions={"timeout": self.timeout})
                response = await self.transport.handle_async_request(request)
            except Exception as exc:
                if client.disconnected:
                    raise _ClientGone() from exc
                if attempt == 1 and isinstance(body, bytes) and never_sent(exc):
                    log.info("upstream connection was closing before the request was "
                             "written; sending it once more [%s]", describe(exc, self.secrets))
                    continue
                raise translate(exc, False) from exc
            opened.append(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, request: str, exc: BaseException, started: bool) -> UpstreamError:
        """A transport failure -> the error to raise, and one redacted log line."""
        if isinstance(exc, UpstreamError):
            return exc
        error = mid_response(exc) if started else before_response(exc)
        log.warning("upstream failed %s for %s: %s [%s]",
                    "mid-response" if started else "before responding", request,
                    error.message, describe(exc, self.secrets), exc_info=not known(exc))
        return error

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def origin_target(scope: Scope) -> str:
    """The request's path and query, to append to the base URL.

    Raises ``RequestError`` (400, "invalid request target") unless the path is
    origin-form: it starts with "/", has no dot segment (plain or encoded: the URL
    parser would resolve it and could climb above the base URL's path), no backslash,
    '#', space or control byte. Non-ASCII bytes are percent-encoded as they are.
    """
    raw = scope.get("raw_path")
    if not raw:
        raw = quote(scope.get("path", ""), safe="/:@!$&'()*+,;=-._~").encode("ascii")
    if isinstance(raw, bytes):  # some servers leave the query in raw_path too
        raw = raw.split(b"?", 1)[0]
    if not isinstance(raw, bytes) or not raw.startswith(b"/") or _BAD_TARGET.search(raw) \
            or any(seg.lower() in _DOT_SEGMENTS for seg in raw.split(b"/")):
        raise RequestError("invalid request target")
    raw = _NON_ASCII.sub(lambda m: b"%%%02X" % m[0][0], raw)
    target = raw.decode("ascii")
    query: bytes = scope.get("query_string") or b""
    if query:
        if b"#" in query or _NON_ASCII.search(query) or re.search(rb"[\x00-\x20\x7f]", query):
            raise RequestError("invalid request target")
        target += "?" + query.decode("ascii")
    return target


def _base_and_headers(config: UpstreamConfig) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The base URL without credentials, and the headers set on every request. URL
    credentials become ``Authorization: Basic`` here (unless ``headers`` sets its own
    Authorization, which wins), so that no URL the transport sees, or puts in an error,
    holds them; aiohttp would also refuse a URL with credentials next to that header."""
    headers = [(k.lower().encode(), v.encode()) for k, v in config.headers]
    url = httpx.URL(config.url)
    if url.userinfo:
        if not any(name == b"authorization" for name, _ in headers):
            basic = f"{url.username}:{url.password}".encode()
            headers.append((b"authorization", b"Basic " + base64.b64encode(basic)))
        url = url.copy_with(userinfo=b"")
    return str(url).rstrip("/"), headers


def _secrets(url: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """Values never to be logged or relayed: URL credentials and the values of the
    credential headers set on every request (whole, and each word, e.g. the token after
    "Bearer")."""
    found: set[str] = set()
    parsed = httpx.URL(url)
    found.update(s for s in (parsed.username, parsed.password) if s)
    found.update(s for s in parsed.userinfo.decode("latin-1").split(":") if s)
    for name, value in headers:
        if not any(word in name for word in _CREDENTIAL_WORDS):
            continue
        text = value.decode("latin-1")
        found.add(text)
        found.update(text.split())
    return tuple(s for s in found if len(s) >= 8)


async def _request_body(receive: Receive, client: _Client) -> bytes | AsyncIterator[bytes]:
    """The request body: bytes when it came in one message, else a stream (unbuffered).
    ``client.body_sent`` is set once it has all been read."""
    message = await receive()
    if message["type"] == "http.disconnect":
        client.disconnected = True
        return b""
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        client.body_sent.set()
        return first

    async def rest() -> AsyncIterator[bytes]:
        yield first
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                client.disconnected = True
                raise _ClientGone()
            if chunk := msg.get("body", b""):
                yield chunk
            if not msg.get("more_body", False):
                client.body_sent.set()
                return

    return rest()


async def _watch_disconnect(receive: Receive, client: _Client,
                            exchange: asyncio.Task[Any]) -> None:
    """Once the body is read, wait for ``http.disconnect`` and cancel the exchange."""
    await client.body_sent.wait()
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server cannot tell us about the client any more: it is gone
        log.debug("receive() failed while watching for a disconnect", exc_info=True)
    client.disconnected = True
    if not client.done:
        client.cancelled = True
        exchange.cancel()


async def _close(response: httpx.Response) -> None:
    try:
        await response.aclose()
    except Exception:  # the exchange is over; a failing close must not change its outcome
        log.debug("closing the upstream response failed", exc_info=True)


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """WebSockets are not proxied (nor guarded): refuse the handshake."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 501, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(_WS_REFUSAL)).encode())]})
        await send({"type": "websocket.http.response.body", "body": _WS_REFUSAL})
    else:
        await send({"type": "websocket.close", "code": 1008})
