"""A fast fake OpenAI upstream: a raw asyncio Protocol on uvloop, parsing with httptools.

``POST /v1/chat/completions`` answers a fixed ~400-byte ``chat.completion`` JSON, or, when
the JSON body has ``"stream": true``, 20 ``chat.completion.chunk`` SSE events and
``data: [DONE]`` (chunked transfer encoding, no delay). ``GET /healthz`` answers 200.
Keep-alive and pipelining are supported. Responses are pre-rendered bytes, so the server
costs a few microseconds of CPU per request and is never the bottleneck of the benchmark
(it was measured faster than uvicorn+httptools with a minimal raw ASGI app).

Run: ``python -m bench.fake_upstream --port 9000`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from typing import cast

import httptools

from bench import payloads

_PATH = payloads.PATH.encode()
_GAP = payloads.GAP_HEADER.encode()
_MAX_GAP_MS = 5_000.0


def _connection(keep_alive: bool) -> bytes:
    return b"" if keep_alive else b"connection: close\r\n"


def _plain(keep_alive: bool) -> bytes:
    body = payloads.completion_body()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n%s" % (len(body), _connection(keep_alive), body))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_head(keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n%s\r\n" % _connection(keep_alive))


def _simple(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), _connection(keep_alive), body))


_EVENTS = payloads.stream_events()
STREAM_FIRST = _chunk(_EVENTS[0])
STREAM_REST = b"".join(_chunk(e) for e in _EVENTS[1:]) + b"0\r\n\r\n"
PLAIN = {ka: _plain(ka) for ka in (True, False)}
STREAM_HEAD = {ka: _stream_head(ka) for ka in (True, False)}
STREAM_WHOLE = {ka: STREAM_HEAD[ka] + STREAM_FIRST + STREAM_REST for ka in (True, False)}
HEALTH = {ka: _simple(b"200 OK", b"ok", ka) for ka in (True, False)}
NOT_FOUND = {ka: _simple(b"404 Not Found", b"not found", ka) for ka in (True, False)}
BAD_REQUEST = _simple(b"400 Bad Request", b"bad request", False)


def wants_stream(body: bytes) -> bool:
    if b'"stream"' not in body:  # fast path: no JSON parse for plain requests
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


class UpstreamProtocol(asyncio.Protocol):
    """One connection. httptools calls the ``on_*`` methods from ``feed_data``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.gap_ms = 0.0
        # While a delayed stream is pending, later (pipelined) responses wait here in order.
        self.held: list[bytes] | None = None
        self.close_after_held = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close()
        except httptools.HttpParserError:
            self._write(BAD_REQUEST)
            self._close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.gap_ms = 0.0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == _GAP:
            try:
                self.gap_ms = min(max(float(value), 0.0), _MAX_GAP_MS)
            except ValueError:
                self.gap_ms = 0.0

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if path == _PATH and method == b"POST":
            if not wants_stream(b"".join(self.body)):
                self._write(PLAIN[keep_alive])
            elif self.gap_ms > 0 and self.held is None:
                self._write(STREAM_HEAD[keep_alive] + STREAM_FIRST)
                self.held = []
                asyncio.get_running_loop().call_later(self.gap_ms / 1000.0, self._release)
            else:
                self._write(STREAM_WHOLE[keep_alive])
        elif path == b"/healthz":
            self._write(HEALTH[keep_alive])
        else:
            self._write(NOT_FOUND[keep_alive])
        if not keep_alive:
            if self.held is None:
                self._close()
            else:
                self.close_after_held = True

    def _write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _release(self) -> None:
        held, self.held = self.held or [], None
        if self.transport is not None:
            self.transport.write(STREAM_REST + b"".join(held))
        if self.close_after_held:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, payloads.LOOPBACK, port,
                                      backlog=4096, reuse_address=True)
    print(f"fake upstream on http://{payloads.LOOPBACK}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
