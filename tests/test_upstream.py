"""UpstreamApp in isolation: header hygiene, error translation, closing on disconnect,
content decoding, WebSockets, HTTP/1.0 framing. (Against real misbehaving upstreams:
test_upstream_boundary.py.)"""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
import websockets
from starlette.types import Message, Receive, Scope, Send

from guardproxy.errors import UpstreamError, UpstreamInterrupted, UpstreamTimeout
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream import UpstreamApp
from guardproxy.upstream.encoding import PIECE, DecodingError, content_decoder
from guardproxy.upstream.framing import http10_send
from guardproxy.upstream.headers import request_headers, response_headers
from tests.conftest import write_policy
from tests.servers import running_server

CONFIG = UpstreamConfig(url="http://upstream.test", dialect="openai",
                        headers=(("Authorization", "Bearer upstream-secret"),),
                        timeout=5.0, connect_timeout=1.0)


def scope(path: str = "/v1/chat/completions") -> dict[str, object]:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"a=1", "headers": [
                (b"authorization", b"Bearer client-key"), (b"x-api-key", b"client-key"),
                (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"), (b"te", b"trailers"),
                (b"content-type", b"application/json"), (b"x-custom", b"kept")]}


def test_request_headers_drop_hop_by_hop_and_client_credentials() -> None:
    out = dict(request_headers(scope()["headers"],  # type: ignore[arg-type]
                               [(b"authorization", b"Bearer upstream-secret")]))
    assert out[b"authorization"] == b"Bearer upstream-secret"
    assert b"x-api-key" not in out and b"x-hop" not in out and b"te" not in out
    assert b"connection" not in out and out[b"x-custom"] == b"kept"
    assert out[b"accept-encoding"] == b"identity"


def test_response_headers_drop_hop_by_hop() -> None:
    out = dict(response_headers([(b"transfer-encoding", b"chunked"), (b"x-a", b"1"),
                                 (b"connection", b"close")]))
    assert out == {b"x-a": b"1"}


class Tracked(httpx.AsyncByteStream):
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.closed = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.chunks):
            self.sent += 1
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        self.closed = True


async def test_stream_is_closed_when_client_disconnects() -> None:
    stream = Tracked(chunks=100)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=stream)

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))
    got: list[Message] = []
    disconnect = asyncio.Event()
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        got.append(message)
        if len(got) == 3:  # start + two chunks, then the client goes away
            disconnect.set()

    await asyncio.wait_for(app(scope(), receive, send), timeout=5)
    assert stream.closed, "the upstream response must be closed on disconnect"
    assert stream.sent < 10, "reading upstream must stop soon after the disconnect"
    assert seen[0].headers["authorization"] == "Bearer upstream-secret"
    assert "x-api-key" not in seen[0].headers
    assert seen[0].url.query == b"a=1"


@pytest.mark.parametrize(("exc", "expected"), [
    (httpx.ConnectError("refused"), UpstreamError),
    (httpx.ReadTimeout("slow"), UpstreamTimeout),
    (httpx.RemoteProtocolError("reset"), UpstreamError),
])
async def test_transport_errors_are_translated(exc: Exception, expected: type) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(expected):
        await app(scope(), receive, send)


async def test_no_cookie_is_kept_or_replayed_and_no_client_identity_added() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"set-cookie": "session=1; Path=/",
                                            "content-length": "2"}, content=b"{}")

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    for _ in range(2):
        await app(scope(), receive, send)
    assert "cookie" not in seen[1].headers, "a cookie set for one caller reached the next"
    assert "user-agent" not in seen[0].headers
    assert seen[0].headers["accept-encoding"] == "identity"
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200, 200]




# -- header hygiene, both ways ---------------------------------------------------------


def test_response_headers_drop_cookies_auth_challenges_and_echoed_secrets() -> None:
    out = response_headers([(b"set-cookie", b"__cf_bm=1"), (b"www-authenticate", b"Bearer"),
                            (b"x-echo", b"Bearer upstream-secret"), (b"x-a", b"1"),
                            (b"content-encoding", b"gzip"), (b"content-length", b"10")],
                           decoded=True, secrets=[b"upstream-secret"])
    assert out == [(b"x-a", b"1")]
    kept = dict(response_headers([(b"content-encoding", b"br")]))
    assert kept == {b"content-encoding": b"br"}, "an undecoded body keeps its coding"


def test_request_headers_drop_cookie_and_expect() -> None:
    out = dict(request_headers([(b"cookie", b"proxy-session=1"), (b"expect", b"100-continue"),
                                (b"x-b", b"2")], []))
    assert b"cookie" not in out and b"expect" not in out and out[b"x-b"] == b"2"


# -- errors from any transport ---------------------------------------------------------


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError("network is down"), UpstreamError),
    (TimeoutError(), UpstreamTimeout),
    (aiohttp.ServerDisconnectedError(), UpstreamError),
    (aiohttp.ClientPayloadError("Response payload is not completed"), UpstreamError),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), UpstreamError),
    (ValueError("a bug somewhere"), UpstreamError),
])
async def test_raw_errors_of_a_transport_are_translated(exc: Exception, expected: type) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(expected) as caught:
        await app(scope(), receive, send)
    assert type(caught.value) is expected
    assert "upstream.test" not in caught.value.message


class Failing(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise aiohttp.ClientPayloadError("Response payload is not completed")


async def test_an_error_mid_stream_is_upstream_interrupted_not_a_group() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Failing())

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))
    sent: list[Message] = []

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(UpstreamInterrupted) as caught:
        await app(scope(), receive, send)
    assert caught.value.message == "upstream closed the connection mid-response"
    assert sent[0]["type"] == "http.response.start" and sent[1]["body"] == b"data: 1\n\n"


async def test_an_error_from_send_is_not_taken_for_an_upstream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{}")

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        raise RuntimeError("the server refused the message")

    with pytest.raises(RuntimeError, match="the server refused"):
        await app(scope(), receive, send)


async def test_a_client_that_leaves_while_sending_its_body_gets_nothing() -> None:
    reached: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        reached.append(request)
        await request.aread()
        return httpx.Response(200, content=b"{}")

    app = UpstreamApp(CONFIG, httpx.MockTransport(handler))
    messages: list[Message] = [{"type": "http.disconnect"},
                               {"type": "http.request", "body": b"{", "more_body": True}]

    async def receive() -> Message:
        return messages.pop()

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent to a client that left")

    await app(scope(), receive, send)  # returns quietly: the middleware sees "cancelled"


# -- content decoding ------------------------------------------------------------------


def test_decoder_handles_gzip_members_pieces_and_truncation() -> None:
    payload = b"0123456789" * 100_000
    two_members = gzip.compress(payload[:500_000]) + gzip.compress(payload[500_000:])
    decoder = content_decoder([(b"Content-Encoding", b"gzip")])
    assert decoder is not None
    pieces = [p for i in range(0, len(two_members), 7) for p in
              decoder.feed(two_members[i:i + 7])] + list(decoder.flush())
    assert b"".join(pieces) == payload
    assert max(map(len, pieces)) <= PIECE, "a small input cannot expand into one huge piece"

    bomb = gzip.compress(b"\0" * (50 << 20))  # ~50 KB that decodes to 50 MB
    decoder = content_decoder([(b"content-encoding", b"gzip")])
    assert decoder is not None
    assert max(len(p) for p in decoder.feed(bomb)) <= PIECE

    truncated = content_decoder([(b"content-encoding", b"gzip")])
    assert truncated is not None
    list(truncated.feed(gzip.compress(payload)[:1000]))
    with pytest.raises(DecodingError):
        list(truncated.flush())


def test_decoder_stacks_codings_and_leaves_unknown_ones_alone() -> None:
    stacked = content_decoder([(b"content-encoding", b"deflate, gzip")])
    assert stacked is not None
    data = gzip.compress(zlib.compress(b"hello"))
    assert b"".join([*stacked.feed(data), *stacked.flush()]) == b"hello"
    assert content_decoder([(b"content-encoding", b"gzip, br")]) is None
    assert content_decoder([(b"content-encoding", b"identity")]) is None
    assert content_decoder([]) is None


# -- WebSocket -------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [True, False])
async def test_a_websocket_is_refused(extension: bool) -> None:
    app = UpstreamApp(CONFIG, httpx.MockTransport(lambda r: httpx.Response(200)))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    ws_scope = {"type": "websocket", "path": "/v1/realtime", "raw_path": b"/v1/realtime",
                "query_string": b"", "headers": [],
                "extensions": {"websocket.http.response": {}} if extension else {}}
    await app(ws_scope, receive, send)
    if extension:
        assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 501
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_a_websocket_is_refused_by_a_real_server() -> None:
    app = UpstreamApp(CONFIG, httpx.MockTransport(lambda r: httpx.Response(200)))
    with running_server(app) as url, pytest.raises(websockets.exceptions.InvalidStatus) as caught:
        async with websockets.connect(url.replace("http", "ws") + "/v1/realtime"):
            pass
    assert caught.value.response.status_code == 501


# -- HTTP/1.0 clients ------------------------------------------------------------------


def raw_exchange(url: str, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` as it is; (head, body) of the answer, read until the close."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.lower(), body


SSE = [b"data: %d\n\n" % i for i in range(5)]


def sse_handler(request: httpx.Request) -> httpx.Response:
    async def events() -> AsyncIterator[bytes]:
        for event in SSE:
            yield event

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())


def framed(app: UpstreamApp) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, http10_send(scope, send))

    return outer


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_http10_send_frames_a_stream_by_length(version: bytes) -> None:
    app = UpstreamApp(CONFIG, httpx.MockTransport(sse_handler))
    with running_server(framed(app)) as url:
        head, body = raw_exchange(url, b"POST /v1/chat/completions HTTP/" + version +
                                  b"\r\nHost: x\r\nContent-Length: 2\r\n"
                                  b"Connection: close\r\n\r\n{}")
    if version == b"1.0":
        assert b"transfer-encoding" not in head
        assert b"content-length: %d" % len(b"".join(SSE)) in head
        assert body == b"".join(SSE)
    else:  # HTTP/1.1 keeps streaming
        assert b"transfer-encoding: chunked" in head


def test_the_proxy_never_sends_chunked_to_an_http10_client(tmp_path: Path) -> None:
    from guardproxy.app import create_app  # here: the rest of this file tests UpstreamApp alone

    app = UpstreamApp(CONFIG, httpx.MockTransport(sse_handler))
    chat = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    with running_server(app) as upstream_url:
        policy = write_policy(tmp_path, "rules: []\n", upstream=upstream_url)
        with running_server(create_app(policy)) as url:
            head, body = raw_exchange(url, b"POST /v1/chat/completions HTTP/1.0\r\n"
                                      b"Host: x\r\nAuthorization: Bearer key-alice\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat))
    assert head.startswith(b"http/1.1 200"), (head, body)
    assert b"transfer-encoding" not in head
    assert body == b"".join(SSE)
