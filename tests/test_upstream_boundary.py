"""UpstreamApp against real misbehaving upstreams: tiny asyncio TCP servers on loopback
that send exactly the bytes each case needs.

What is checked: every transport failure comes out of UpstreamApp as guardproxy's own
error (UpstreamError / UpstreamTimeout before the response started, UpstreamInterrupted
after; never an aiohttp error, an OSError or an ExceptionGroup), with a message that
names neither the upstream's address nor its credentials; a request that never left is
sent again; a client that leaves cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.types import Message

from guardproxy.errors import (
    RequestError,
    UpstreamError,
    UpstreamInterrupted,
    UpstreamTimeout,
)
from guardproxy.policy.model import UpstreamConfig
from guardproxy.upstream import UpstreamApp
from guardproxy.upstream.encoding import PIECE
from tests.servers import running_server

PASSWORD = "pw-9f8e7d6c5b4a"
USER = "proxyuser"


# -- a scriptable upstream ------------------------------------------------------------


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> tuple[bytes, bytes]:
        """One request: (head, body); the body is read by content-length."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST rather than a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def peer_closed(self) -> None:
        """Return once the proxy has closed its side (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


Handler = Callable[[Conn], Awaitable[None]]


@dataclass
class Upstream:
    handler: Handler
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handler(Conn(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[Upstream]:
    up = Upstream(handler)
    up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        up.server.close()


def config(port: int, timeout: float = 5.0) -> UpstreamConfig:
    return UpstreamConfig(url=f"http://{USER}:{PASSWORD}@127.0.0.1:{port}", dialect="openai",
                          headers=(), timeout=timeout, connect_timeout=1.0)


def http_scope(method: str = "POST", path: str = "/v1/chat/completions",
               http_version: str = "1.1") -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
            "query_string": b"", "http_version": http_version,
            "headers": [(b"content-type", b"application/json")]}


@dataclass
class Result:
    sent: list[Message]
    error: BaseException | None

    @property
    def started(self) -> bool:
        return any(m["type"] == "http.response.start" for m in self.sent)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent
                        if m["type"] == "http.response.body")


async def call(app: UpstreamApp, method: str = "POST", path: str = "/v1/chat/completions",
               body: bytes = b"{}", disconnect: asyncio.Event | None = None) -> Result:
    """Run one request through the app, as a server would; never raises."""
    sent: list[Message] = []
    delivered = False
    gone = disconnect or asyncio.Event()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        async with asyncio.timeout(10):  # in this task: no extra turn of the loop
            await app(http_scope(method, path), receive, send)
    except BaseException as exc:  # the test decides what was acceptable
        return Result(sent, exc)
    return Result(sent, None)


def assert_generic(error: BaseException | None, port: int) -> None:
    """The message a client could read names no address, port or credential."""
    assert isinstance(error, UpstreamError), repr(error)
    for leak in ("127.0.0.1", str(port), USER, PASSWORD, "http://"):
        assert leak not in error.message, error.message


# -- 1. faults before the response started ------------------------------------------

OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


async def non_http(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http at all\r\n")


async def huge_header(conn: Conn) -> None:
    await conn.request()
    await conn.send(OK_HEAD + b"x-big: " + b"a" * 200_000 + b"\r\ncontent-length: 2\r\n\r\n{}")


async def reset_before_head(conn: Conn) -> None:
    await conn.request()
    conn.reset()


async def close_before_head(conn: Conn) -> None:
    await conn.request()


async def short_small_body(conn: Conn) -> None:
    await conn.request()
    await conn.send(OK_HEAD + b"content-length: 100\r\n\r\n{\"partial\":")


async def short_small_body_reset(conn: Conn) -> None:
    await short_small_body(conn)
    conn.reset()


async def corrupt_gzip(conn: Conn) -> None:
    await conn.request()
    await conn.send(OK_HEAD + b"content-encoding: gzip\r\ncontent-length: 12\r\n\r\n"
                    + b"\x1f\x8bnot-gzip!!")


@pytest.mark.parametrize("handler", [non_http, huge_header, reset_before_head,
                                     close_before_head, short_small_body,
                                     short_small_body_reset, corrupt_gzip])
async def test_failure_before_the_response_is_an_upstream_error(
        handler: Handler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "guardproxy.upstream")
    async with upstream(handler) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert type(result.error) is UpstreamError, repr(result.error)
    assert not result.sent, "nothing may reach the client: the middleware sends the 502"
    assert_generic(result.error, up.port)
    assert PASSWORD not in caplog.text
    assert "upstream failed before responding" in caplog.text  # the details are logged


async def test_refused_port_is_unreachable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = UpstreamApp(config(port))
    result = await call(app)
    await app.aclose()
    assert type(result.error) is UpstreamError and not result.sent
    assert result.error.message == "upstream unreachable"
    assert_generic(result.error, port)


async def test_slow_head_beyond_the_timeout_is_an_upstream_timeout() -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await conn.peer_closed()

    async with upstream(silent) as up:
        app = UpstreamApp(config(up.port, timeout=0.3))
        result = await call(app)
        await app.aclose()
    assert type(result.error) is UpstreamTimeout and not result.sent
    assert_generic(result.error, up.port)


async def test_head_answered_with_a_body_fails_cleanly_and_poisons_nothing() -> None:
    async def head_with_body(conn: Conn) -> None:
        while True:
            head, _ = await conn.request()
            if head.startswith(b"HEAD"):
                await conn.send(OK_HEAD + b"content-length: 5\r\n\r\nhello")
            else:
                await conn.send(OK_HEAD + b"content-length: 2\r\n\r\n{}")

    async with upstream(head_with_body) as up:
        app = UpstreamApp(config(up.port))
        head = await call(app, method="HEAD")
        after = await call(app)
        await app.aclose()
    # aiohttp reads the stray body as the next response's status line: a bad response
    assert head.error is None or type(head.error) is UpstreamError, repr(head.error)
    if head.error is None:
        assert head.body == b""
    assert after.error is None and after.status == 200 and after.body == b"{}"


# -- 1. faults after the response started --------------------------------------------

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def sse_then_reset(conn: Conn) -> None:
    await conn.request()
    await conn.send(SSE_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
    await asyncio.sleep(0.05)
    conn.reset()


async def sse_then_close(conn: Conn) -> None:
    await conn.request()
    await conn.send(SSE_HEAD + chunk(b"data: 1\n\n") + b"20\r\ndata: trunc")


async def large_body_short(conn: Conn) -> None:
    await conn.request()
    await conn.send(OK_HEAD + b"content-length: 3000000\r\n\r\n" + b"x" * 1_500_000)


async def sse_then_silence(conn: Conn) -> None:
    await conn.request()
    await conn.send(SSE_HEAD + chunk(b"data: 1\n\n"))
    await conn.peer_closed()


@pytest.mark.parametrize(("handler", "read_timeout"), [
    (sse_then_reset, 5.0), (sse_then_close, 5.0), (large_body_short, 5.0),
    (sse_then_silence, 0.3)])
async def test_failure_mid_response_is_upstream_interrupted(handler: Handler,
                                                            read_timeout: float) -> None:
    async with upstream(handler) as up:
        app = UpstreamApp(config(up.port, timeout=read_timeout))
        result = await call(app)
        await app.aclose()
    assert type(result.error) is UpstreamInterrupted, repr(result.error)
    assert result.started and result.status == 200
    assert result.body, "what arrived before the failure was relayed"
    assert_generic(result.error, up.port)


# -- 2. the request target -------------------------------------------------------------


@pytest.mark.parametrize("path", ["*", "http://evil.example/v1/x", "v1/chat", "",
                                  "/v1/../admin", "/v1/%2e%2e/admin", "/v1/./x",
                                  "/a b", "/a#b", "/a\\b"])
async def test_a_target_that_is_not_origin_form_is_never_forwarded(path: str) -> None:
    async def record(conn: Conn) -> None:
        head, _ = await conn.request()
        up.requests.append(head)
        await conn.send(OK_HEAD + b"content-length: 2\r\n\r\n{}")

    async with upstream(record) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app, method="OPTIONS", path=path)
        await app.aclose()
    assert isinstance(result.error, RequestError) and result.error.status == 400
    assert result.error.message == "invalid request target"
    assert not result.sent and not up.requests


async def test_url_credentials_become_basic_auth_and_the_path_is_appended() -> None:
    async def record(conn: Conn) -> None:
        head, _ = await conn.request()
        up.requests.append(head)
        await conn.send(OK_HEAD + b"content-length: 2\r\n\r\n{}")

    async with upstream(record) as up:
        cfg = config(up.port)
        app = UpstreamApp(UpstreamConfig(url=cfg.url + "/base/", dialect="openai", headers=(),
                                         timeout=5.0, connect_timeout=1.0))
        result = await call(app, path="/v1/caf%C3%A9")
        await app.aclose()
    assert result.error is None and result.status == 200
    head = up.requests[0].decode()
    assert head.startswith("POST /base/v1/caf%C3%A9 HTTP/1.1\r\n")
    assert "authorization: basic " in head.lower() and PASSWORD not in head


# -- 3. content-encodings ----------------------------------------------------------------


async def test_gzip_json_with_content_length_is_relayed_decoded() -> None:
    payload = b'{"choices":[{"message":{"content":"' + b"hello " * 500 + b'"}}]}'
    packed = gzip.compress(payload)

    async def gz(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK_HEAD + b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
                        % len(packed) + packed)

    async with upstream(gz) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert result.error is None and result.body == payload
    assert b"content-encoding" not in result.headers
    assert result.headers[b"content-length"] == str(len(payload)).encode()


async def test_gzip_chunked_sse_is_relayed_decoded() -> None:
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(20)]
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    pieces = [packer.compress(e) + packer.flush(zlib.Z_SYNC_FLUSH) for e in events]
    pieces.append(packer.flush())

    async def gz_sse(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n"))
        for piece in pieces:
            await conn.send(chunk(piece))
            await asyncio.sleep(0.01)  # separate reads, so that the relay sees pieces
        await conn.send(b"0\r\n\r\n")

    async with upstream(gz_sse) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert result.error is None and result.body == b"".join(events)
    assert b"content-encoding" not in result.headers
    assert sum(1 for m in result.sent if m.get("more_body")) > 1, "still streamed"


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])  # zlib-wrapped, raw
async def test_deflate_is_relayed_decoded(wbits: int) -> None:
    payload = b'{"ok": true, "text": "' + b"abc" * 1000 + b'"}'
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(payload) + packer.flush()

    async def deflate(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK_HEAD + b"content-encoding: deflate\r\ncontent-length: %d\r\n\r\n"
                        % len(packed) + packed)

    async with upstream(deflate) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert result.error is None and result.body == payload
    assert b"content-encoding" not in result.headers


async def test_a_small_gzip_body_that_decodes_large_is_streamed_not_buffered() -> None:
    payload = b"[" + b"0," * 2_000_000 + b"0]"  # 4 MB of JSON, ~4 KB compressed
    packed = gzip.compress(payload)

    async def gz(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK_HEAD + b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
                        % len(packed) + packed)

    async with upstream(gz) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert result.error is None and result.body == payload
    assert b"content-length" not in result.headers and b"content-encoding" not in result.headers
    assert max(len(m.get("body", b"")) for m in result.sent) <= (1 << 20) + PIECE


async def test_head_keeps_the_length_of_the_body_it_describes() -> None:
    async def head(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK_HEAD + b"content-length: 1234\r\n\r\n")

    async with upstream(head) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app, method="HEAD")
        await app.aclose()
    assert result.error is None and result.body == b""
    assert result.headers[b"content-length"] == b"1234"


async def test_an_unknown_encoding_passes_through_with_its_header() -> None:
    opaque = bytes(range(256)) * 4

    async def br(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK_HEAD + b"content-encoding: br\r\ncontent-length: %d\r\n\r\n"
                        % len(opaque) + opaque)

    async with upstream(br) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert result.error is None and result.body == opaque
    assert result.headers[b"content-encoding"] == b"br"
    assert result.headers[b"content-length"] == str(len(opaque)).encode()


# -- 4. a request that never left is sent again ------------------------------------------


def flaky_upstream(seen: list[bytes]) -> Handler:
    """Answers /fail with a 500 and closes the connection right after, without saying
    so ("connection: close"): the client has pooled it for its next request."""
    async def flaky(conn: Conn) -> None:
        while True:
            head, _ = await conn.request()
            path = head.split(b" ")[1]
            seen.append(path)
            if path == b"/fail":
                await conn.send(b"HTTP/1.1 500 Internal Server Error\r\n"
                                b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                return
            await conn.send(OK_HEAD + b"content-length: 2\r\n\r\n{}")

    return flaky


async def test_a_request_after_a_500_that_closed_the_connection_succeeds() -> None:
    seen: list[bytes] = []
    async with upstream(flaky_upstream(seen)) as up:
        app = UpstreamApp(config(up.port))
        for _ in range(20):
            failed = await call(app, path="/fail")
            after = await call(app, path="/ok")
            assert failed.error is None and failed.status == 500
            assert after.error is None, repr(after.error)
            assert after.status == 200
        await app.aclose()
    assert seen.count(b"/ok") == 20, "each request reached the upstream exactly once"


async def test_a_pooled_connection_found_closing_at_the_first_write_is_replaced(
        caplog: pytest.LogCaptureFixture) -> None:
    """The exact race: the 500 is read and its connection pooled before its FIN is
    processed, so the next request takes the connection and finds it closing when it
    writes (aiohttp: "Cannot write to closing transport"). Reading the 500 straight off
    the transport, in this task, leaves no turn of the event loop in between."""
    caplog.set_level(logging.INFO, "guardproxy.upstream")
    seen: list[bytes] = []
    async with upstream(flaky_upstream(seen)) as up:
        app = UpstreamApp(config(up.port))
        for _ in range(20):
            stale = await app.transport.handle_async_request(httpx.Request(
                "POST", f"http://127.0.0.1:{up.port}/fail", content=b"{}",
                extensions={"timeout": app.timeout}))
            await stale.aread()
            await stale.aclose()
            after = await call(app, path="/ok")
            assert after.error is None, repr(after.error)
            assert after.status == 200
        await app.aclose()
    assert seen.count(b"/ok") == 20, "each request reached the upstream exactly once"
    assert "sending it once more" in caplog.text, "the race was not reproduced"


async def test_a_request_the_upstream_may_have_read_is_not_sent_again() -> None:
    seen: list[bytes] = []

    async def read_then_drop(conn: Conn) -> None:
        head, _ = await conn.request()
        seen.append(head)
        conn.reset()  # it read the request: it may have started generating

    async with upstream(read_then_drop) as up:
        app = UpstreamApp(config(up.port))
        result = await call(app)
        await app.aclose()
    assert type(result.error) is UpstreamError
    assert len(seen) == 1


# -- 5. the client leaves: the upstream request is cancelled ------------------------------


@dataclass
class Observed:
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False


def slow_upstream(seen: Observed, head: bytes = b"") -> Handler:
    """Answers after 30 s, unless the proxy closes the connection first; with ``head``,
    sends it (and one event) at once and then goes silent instead."""
    async def handler(conn: Conn) -> None:
        await conn.request()
        seen.got_request.set()
        if head:
            await conn.send(head + chunk(b"data: 1\n\n"))
        closed = asyncio.ensure_future(conn.peer_closed())
        done, _ = await asyncio.wait({closed}, timeout=30)
        if closed in done:
            seen.peer_closed.set()
            return
        seen.finished = True
        closed.cancel()
        await conn.send(OK_HEAD + b"content-length: 2\r\n\r\n{}")

    return handler


async def test_disconnect_before_the_head_cancels_the_upstream_request() -> None:
    seen = Observed()
    async with upstream(slow_upstream(seen)) as up:
        app = UpstreamApp(config(up.port))
        gone = asyncio.Event()
        running = asyncio.ensure_future(call(app, disconnect=gone))
        await asyncio.wait_for(seen.got_request.wait(), 5)
        gone.set()
        result = await asyncio.wait_for(running, 5)
        await asyncio.wait_for(seen.peer_closed.wait(), 5)
        await app.aclose()
    assert result.error is None, "a client that left is not an upstream failure"
    assert result.sent == [], "nothing is sent to a client that left"
    assert not seen.finished


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_the_head_through_a_real_server(stream: bool) -> None:
    seen = Observed()
    async with upstream(slow_upstream(seen)) as up:
        app = UpstreamApp(config(up.port))
        with running_server(app) as url:
            async with httpx.AsyncClient() as client:
                body = b'{"stream": true}' if stream else b"{}"
                request = asyncio.ensure_future(client.post(
                    url + "/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"}, timeout=30))
                await asyncio.wait_for(seen.got_request.wait(), 5)
                request.cancel()  # the client goes away: its connection is closed
                with contextlib.suppress(asyncio.CancelledError):
                    await request
            await asyncio.wait_for(seen.peer_closed.wait(), 5)
    assert not seen.finished


async def test_disconnect_mid_stream_closes_the_upstream_connection() -> None:
    seen = Observed()
    async with upstream(slow_upstream(seen, head=SSE_HEAD)) as up:
        app = UpstreamApp(config(up.port))
        with running_server(app) as url:
            async with httpx.AsyncClient() as client, client.stream(
                    "POST", url + "/v1/chat/completions", content=b"{}", timeout=30) as resp:
                async for _ in resp.aiter_raw():
                    break  # one event, then the client goes away
            await asyncio.wait_for(seen.peer_closed.wait(), 5)
    assert not seen.finished
