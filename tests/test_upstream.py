"""UpstreamApp in isolation: header hygiene, error translation, closing on disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.types import Message

from guardproxy.errors import UpstreamError, UpstreamTimeout
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream import UpstreamApp
from guardproxy.upstream.headers import request_headers, response_headers

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


