"""Time to first byte of a streamed response, at concurrency 1, from a tiny raw client.

One keep-alive connection, blocking sockets, httptools for parsing: TTFB is the time from
the last ``sendall`` of the request to the first body byte parsed (the first SSE event).
The request carries the fake upstream's gap header, so the upstream sends the first event,
waits ``gap_ms``, then sends the rest: a proxy that buffers the stream shows TTFB >= gap.
Bounded by a sample count and a wall-clock limit.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httptools

from bench import payloads
from bench.loadgen import percentile


@dataclass(frozen=True)
class TtfbResult:
    samples: int
    p50_ms: float
    p99_ms: float
    total_p50_ms: float  # whole stream, including the gap
    non2xx: int
    gap_ms: float


class _Response:
    def __init__(self) -> None:
        self.first_body_at: float | None = None
        self.complete = False

    def on_body(self, body: bytes) -> None:
        if self.first_body_at is None and body:
            self.first_body_at = time.perf_counter()

    def on_message_complete(self) -> None:
        self.complete = True


def _request(gap_ms: float) -> bytes:
    body = payloads.request_body(stream=True)
    lines = [f"POST {payloads.PATH} HTTP/1.1", f"Host: {payloads.LOOPBACK}",
             f"Content-Length: {len(body)}", f"{payloads.GAP_HEADER}: {gap_ms:g}"]
    lines += [f"{k}: {v}" for k, v in payloads.request_headers().items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((payloads.LOOPBACK, port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure(port: int, samples: int, max_seconds: float, gap_ms: float = 2.0,
            warmup: int = 5) -> TtfbResult:
    request = _request(gap_ms)
    ttfb: list[float] = []
    totals: list[float] = []
    non2xx = 0
    deadline = time.monotonic() + max_seconds
    sock = _connect(port)
    try:
        for i in range(warmup + samples):
            if time.monotonic() > deadline:
                break
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            t0 = time.perf_counter()
            sock.sendall(request)
            while not response.complete:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection mid-response")
                parser.feed_data(data)
            t1 = time.perf_counter()
            status = parser.get_status_code()
            if i >= warmup:
                if 200 <= status < 300 and response.first_body_at is not None:
                    ttfb.append(response.first_body_at - t0)
                    totals.append(t1 - t0)
                else:
                    non2xx += 1
            if not parser.should_keep_alive():
                sock.close()
                sock = _connect(port)
    finally:
        sock.close()
    ttfb.sort()
    totals.sort()
    return TtfbResult(samples=len(ttfb), p50_ms=percentile(ttfb, 50) * 1000,
                      p99_ms=percentile(ttfb, 99) * 1000,
                      total_p50_ms=percentile(totals, 50) * 1000, non2xx=non2xx, gap_ms=gap_ms)
