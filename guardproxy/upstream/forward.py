"""``UpstreamApp``: a pure ASGI app that forwards each request to the model API.

httpx is the HTTP API (requests, responses, timeouts, errors); the transport under it is
aiohttp's, chosen by measurement (httpcore's pool collapses under concurrency,
encode/httpx#3215; see bench/). ``UpstreamApp`` plays the client: it builds each request
and hands it straight to the transport, because a proxy needs none of ``AsyncClient``'s
per-response behaviour — no redirects, no auth flows, and above all no cookie jar shared
by every caller (httpx offers each response to its jar, and wrapping it for the jar alone
cost ~5% of a proxied request's CPU). httpx and aiohttp errors are translated here into
``UpstreamError`` / ``UpstreamTimeout``. Streamed bodies are relayed chunk by chunk, and
the upstream response is always closed in this module's own ``finally`` — on completion,
error or client disconnect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from guardproxy.errors import UpstreamError, UpstreamTimeout
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream.headers import request_headers, response_headers

_BUFFER_LIMIT = 1 << 20  # non-streamed bodies up to this size are sent in one message


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


class UpstreamApp:
    def __init__(self, config: UpstreamConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.base = config.url
        self.headers = [(k.lower().encode(), v.encode()) for k, v in config.headers]
        self.timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout).as_dict()
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
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        url = self.base + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            request = httpx.Request(scope["method"], url,
                                    headers=request_headers(scope["headers"], self.headers),
                                    content=await _read_or_stream(receive),
                                    extensions={"timeout": self.timeout})
            response = await self.transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _translate(exc, "upstream unreachable") from exc
        except httpx.InvalidURL as exc:
            raise UpstreamError(f"cannot forward to {url!r}: {exc}") from exc
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
