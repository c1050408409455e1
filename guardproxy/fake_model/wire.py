"""How an answer goes out: SSE framing, gzip (whatever Accept-Encoding said), a stream
cut off mid-way, the final event left unterminated, and the ledger kept up to date as
tokens are generated."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from guardproxy.fake_model.knobs import Behaviour
from guardproxy.fake_model.ledger import Executed

AUDIO_BYTES = 600_000


@dataclass(frozen=True, slots=True)
class Piece:
    """One stream event. ``data`` is empty for a token generated but never sent (a
    best_of sequence); ``tokens`` were generated to produce it; ``full_usage`` marks an
    event whose usage covers the whole answer."""

    data: str
    tokens: int = 0
    full_usage: bool = False


def event(obj: Any, name: str | None = None, *, raw_unicode: bool = False) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=not raw_unicode)}\n\n"


def own_ratelimit(anthropic: bool) -> dict[str, str]:
    """The upstream's own rate-limit headers, as a real API sends them."""
    if anthropic:
        reset = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {f"anthropic-ratelimit-{r}-{k}": v for r, limit in (("requests", "9999"),
                                                                     ("tokens", "9999999"))
                for k, v in (("limit", limit), ("remaining", limit[:-1] + "8"),
                             ("reset", reset))}
    return {"x-ratelimit-limit-requests": "9999", "x-ratelimit-remaining-requests": "9998",
            "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "9999999",
            "x-ratelimit-remaining-tokens": "9999998", "x-ratelimit-reset-tokens": "1ms"}


def json_answer(obj: Any, status: int, headers: dict[str, str], behave: Behaviour) -> Response:
    """A JSON body as starlette's JSONResponse renders it, gzipped when asked (with
    Content-Length either way)."""
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return bytes_answer(body, status, headers, behave, "application/json")


def bytes_answer(body: bytes, status: int, headers: dict[str, str], behave: Behaviour,
                 media_type: str) -> Response:
    if behave.gzip:
        body = gzip.compress(body, mtime=0)
        headers = {**headers, "content-encoding": "gzip"}
    return Response(body, status_code=status, headers=headers, media_type=media_type)


def audio_body() -> bytes:
    """About 600 kB of deterministic bytes behind an ID3 header: no text, no usage."""
    block = b"".join(zlib.crc32(i.to_bytes(4, "big")).to_bytes(4, "big") for i in range(1024))
    return (b"ID3\x04\x00\x00\x00\x00\x00\x00" + block * (AUDIO_BYTES // len(block) + 1)
            )[:AUDIO_BYTES]


class StreamAnswer(StreamingResponse):
    """An SSE answer sent piece by piece. Counts each piece's tokens into ``record`` as
    it is generated; stops generating when the client goes away; with ``reset_after``
    returns after that many events without finishing the body (uvicorn then closes the
    connection: no terminating chunk); with ``unterminated`` the last event loses its
    blank line."""

    def __init__(self, pieces: Iterable[Piece], *, headers: dict[str, str], delay: float,
                 behave: Behaviour, record: Executed) -> None:
        if behave.gzip:
            headers = {**headers, "content-encoding": "gzip"}
        super().__init__(iter(()), headers=headers, media_type="text/event-stream")
        self.pieces = pieces
        self.delay = delay
        self.behave = behave
        self.record = record
        self.ending = False  # the last body message is being sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self.ending:  # uvicorn says "disconnect" once the body is done
                        record.cancelled = record.cancelled or "during"
                        group.cancel_scope.cancel()

                group.start_soon(watch)
                await self._pump(send)
                group.cancel_scope.cancel()
        except OSError:  # uvicorn's ClientDisconnected
            if not self.ending:
                record.cancelled = record.cancelled or "during"
        finally:
            record.finished = True

    async def _pump(self, send: Send) -> None:
        compressor = zlib.compressobj(wbits=31) if self.behave.gzip else None
        sent = 0
        for piece in self._generated():
            if not piece.data:
                continue
            if self.behave.reset_after is not None and sent >= self.behave.reset_after:
                self.record.reset = True
                return  # the body is never finished: the connection is cut
            # a pause (or at least a yield) per event, so a disconnect is noticed as soon
            # as a real server would, between two generation steps
            await anyio.sleep(self.delay if sent else 0)
            data = piece.data.encode()
            if compressor is not None:
                data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await send({"type": "http.response.body", "body": data, "more_body": True})
            sent += 1
            if piece.full_usage:
                self.record.usage_sent = True
        tail = compressor.flush() if compressor is not None else b""
        self.ending = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _generated(self) -> Iterator[Piece]:
        """The pieces, counting tokens as each is generated; with ``unterminated`` one
        piece ahead, so the last one is known and sent without its blank line."""
        held: Piece | None = None
        for piece in self.pieces:
            self.record.completion_tokens += piece.tokens
            if not self.behave.unterminated:
                yield piece
            elif piece.data:
                if held is not None:
                    yield held
                held = piece
            else:
                yield piece
        if held is not None:
            yield Piece(held.data.removesuffix("\n"), held.tokens, held.full_usage)
