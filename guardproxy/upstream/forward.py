"""``UpstreamApp``: a pure ASGI app that forwards each request to the model API.

httpx is the client API; the transport under it is aiohttp's, chosen by measurement
(httpcore's pool collapses under concurrency, encode/httpx#3215; see bench/). httpx
and aiohttp errors are translated here into ``UpstreamError`` / ``UpstreamTimeout``.
Streamed bodies are relayed chunk by chunk, and the upstream response is always
closed in this module's own ``finally`` — on completion, error or client disconnect.
"""

from __future__ import annotations

import http.cookiejar
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from guardproxy.errors import UpstreamError, UpstreamTimeout
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream.headers import request_headers, response_headers

_BUFFER_LIMIT = 1 << 20  # non-streamed bodies up to this size are sent in one message


class _NoCookies(http.cookiejar.CookieJar):
    """The proxy is shared by many clients: it must never keep or replay a cookie.

    A jar that ignores everything, rather than a policy that refuses each cookie: httpx
    offers every response to the jar, and parsing what would be refused anyway cost
    ~7% of a proxied request's CPU."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


def make_client(config: UpstreamConfig) -> httpx.AsyncClient:
    timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    transport: httpx.AsyncBaseTransport
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limits.max_connections or 0,
                                             keepalive_timeout=30)
            return aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar())

        transport = AiohttpTransport(limits=limits, client=session)
    except ImportError:  # pragma: no cover - httpx-aiohttp is a declared dependency
        transport = httpx.AsyncHTTPTransport(limits=limits)
    client = httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False,
                               cookies=_NoCookies())
    client.headers.clear()  # no httpx user-agent or accept-encoding of its own
    return client


class UpstreamApp:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.base = config.url
        self.headers = [(k.lower().encode(), v.encode()) for k, v in config.headers]
        self._client = client

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        url = self.base + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(
            scope["method"], url,
            headers=request_headers(scope["headers"], self.headers),
            content=await _read_or_stream(receive),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc, "upstream unreachable") from exc
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": response_headers(response.headers.raw)})
            if _buffered(response):
                body = await response.aread()
                await send({"type": "http.response.body", "body": body})
            else:
                await _relay(response, receive, send)
        except httpx.HTTPError as exc:
            raise _translate(exc, "upstream failed mid-response") from exc
        finally:
            await response.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _translate(exc: httpx.HTTPError, context: str) -> UpstreamError:
    """httpx (and, beneath it, aiohttp) errors -> the package's own tree. httpx-aiohttp
    reports a refused connection as ConnectTimeout, so the root cause decides."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError | ConnectionResetError):
            return UpstreamError(f"{context}: {cause}")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream did not answer in time: {exc}")
    return UpstreamError(f"{context}: {exc}")


def _buffered(response: httpx.Response) -> bool:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return False
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= _BUFFER_LIMIT


async def _read_or_stream(receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The request body: bytes when it came in one message, else a stream (unbuffered)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise UpstreamError("client disconnected before the request was sent")
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return first

    async def rest() -> AsyncIterator[bytes]:
        yield first
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise UpstreamError("client disconnected while sending the request")
            yield msg.get("body", b"")
            if not msg.get("more_body", False):
                return

    return rest()


async def _relay(response: httpx.Response, receive: Receive, send: Send) -> None:
    """Send each upstream chunk as it arrives; stop as soon as the client goes away."""
    async with anyio.create_task_group() as group:

        async def watch_disconnect() -> None:
            message: Message = await receive()
            while message["type"] != "http.disconnect":
                message = await receive()
            group.cancel_scope.cancel()

        group.start_soon(watch_disconnect)
        async for chunk in response.aiter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        group.cancel_scope.cancel()
