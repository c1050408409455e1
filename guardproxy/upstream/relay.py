"""The response side of ``UpstreamApp``: the upstream's status, headers and body, sent on
to the client as ASGI messages.

Bodies are relayed decoded (``encoding.py``). A small body (a ``content-length`` up to
``BUFFER_LIMIT``, not an event stream) is read whole before anything is sent, so that a
failure while reading it is still an error response, and it goes out with its decoded
length; anything else streams chunk by chunk. Reading errors are raised through
``translate(exc, started)``: before ``http.response.start`` as ``UpstreamError`` /
``UpstreamTimeout``, after as ``UpstreamInterrupted``. Errors from ``send`` (the client
side) pass untouched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing

import httpx
from starlette.types import Send

from guardproxy.errors import UpstreamError
from guardproxy.upstream.encoding import content_decoder
from guardproxy.upstream.headers import RawHeaders, response_headers

BUFFER_LIMIT = 1 << 20  # bytes: bodies up to this size go to the client in one message
_NO_BODY_STATUS = frozenset({204, 304})

Translate = Callable[[BaseException, bool], UpstreamError]


class Relay:
    """Relays one upstream response; ``started`` says whether the client has its head."""

    def __init__(self, response: httpx.Response, method: str, send: Send,
                 translate: Translate, secrets: Iterable[bytes] = (),
                 origin: bytes = b"") -> None:
        self.response = response
        self.head = method == "HEAD"
        self.head_only = self.head or response.status_code in _NO_BODY_STATUS
        self.send = send
        self.translate = translate
        self.decoder = content_decoder(response.headers.raw)
        self.headers = response_headers(response.headers.raw,
                                         decoded=self.decoder is not None, secrets=secrets,
                                         origin=origin)
        self.started = False

    async def run(self) -> None:
        raw = self.response.headers.raw
        if self.head_only:
            length = _content_length(raw)
            if self.head and self.decoder is None and length is not None:
                self.headers.append((b"content-length", str(length).encode()))
            await self._start()
            await self.send({"type": "http.response.body", "body": b""})
            return
        async with aclosing(self._pieces()) as pieces:
            held = b""
            if _bufferable(raw):
                parts: list[bytes] = []
                size = 0
                async for piece in pieces:
                    parts.append(piece)
                    size += len(piece)
                    if size > BUFFER_LIMIT:  # it decoded larger than announced: stream on
                        break
                else:
                    body = b"".join(parts)
                    self.headers.append((b"content-length", str(len(body)).encode()))
                    await self._start()
                    await self.send({"type": "http.response.body", "body": body})
                    return
                held = b"".join(parts)
            await self._start()
            if held:
                await self.send({"type": "http.response.body", "body": held, "more_body": True})
            async for piece in pieces:
                await self.send({"type": "http.response.body", "body": piece,
                                 "more_body": True})
            await self.send({"type": "http.response.body", "body": b""})

    async def _start(self) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": self.response.status_code,
                         "headers": self.headers})

    async def _pieces(self) -> AsyncGenerator[bytes, None]:
        """The body, decoded, in non-empty pieces; upstream failures translated."""
        decoder = self.decoder
        stream = self.response.stream  # raw bytes; unlike aiter_raw(), also re-reads a
        assert isinstance(stream, httpx.AsyncByteStream)  # body given whole (MockTransport)
        try:
            async for chunk in stream:
                if decoder is None:
                    if chunk:
                        yield chunk
                    continue
                for piece in decoder.feed(chunk):
                    yield piece
            if decoder is not None:
                for piece in decoder.flush():
                    yield piece
        except Exception as exc:
            raise self.translate(exc, self.started) from exc


def _content_length(headers: RawHeaders) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _bufferable(headers: RawHeaders) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type" and value.lower().startswith(b"text/event-stream"):
            return False
    length = _content_length(headers)
    return length is not None and length <= BUFFER_LIMIT
