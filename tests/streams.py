"""Helpers for response-path tests: feed a ``ResponseDriver`` a body in any chunking, and
read SSE bytes back as events.

``cuts`` are arbitrary integers (hypothesis draws them); each is taken modulo the body's
length + 1, so any list gives valid cut points, and a cut may split a UTF-8 sequence, a
CRLF or an event boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.sse import SSEFramer

Headers = list[tuple[bytes, bytes]]
SSE: Headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON: Headers = [(b"content-type", b"application/json")]
MAX_EVENT = 4 << 20


def pieces(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``body`` cut at ``cuts`` (mod len+1); always at least one piece (maybe empty)."""
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)] or [b""]


def feed(driver: ResponseDriver, parts: Sequence[bytes]) -> bytes:
    """Every part through ``driver.body``, the last one final; what the client got."""
    out = [driver.body(part, i == len(parts) - 1) for i, part in enumerate(parts)]
    return b"".join(out)


def drive(stages: list[ResponseStage], status: int, headers: Headers, body: bytes,
          cuts: Iterable[int] = (), *, max_event_bytes: int = MAX_EVENT,
          ending: Ending | None = Ending.COMPLETED) -> bytes:
    """One response through a fresh driver, as the middleware runs it: ``start``, the
    body in pieces, then ``finish(ending)`` (skipped when ``ending`` is None)."""
    driver = ResponseDriver(stages, max_event_bytes)
    driver.start(status, headers)
    out = feed(driver, pieces(body, cuts))
    if ending is not None:
        asyncio.run(driver.finish(ending))
    return out


_LINE_END = re.compile(rb"\r\n|\r|\n")


def frame(body: bytes) -> tuple[list[bytes], bytes]:
    """(the complete event blocks of a whole ``body``, the unterminated rest), read as
    the SSE spec says and independently of ``SSEFramer``: lines end in CRLF, LF or CR,
    and an empty line ends an event. Each block keeps its bytes, blank line included."""
    blocks: list[bytes] = []
    start = pos = 0
    for match in _LINE_END.finditer(body):
        if match.start() == pos:       # an empty line: the event ends here
            blocks.append(body[start:match.end()])
            start = match.end()
        pos = match.end()
    return blocks, body[start:]


def framer_blocks(parts: Sequence[bytes], limit: int = MAX_EVENT) -> list[bytes]:
    """What ``SSEFramer`` cuts out of ``parts`` fed in order, its flushed rest last
    (when there is one)."""
    framer = SSEFramer(limit)
    blocks = [block for part in parts for block in framer.feed(part)]
    rest = framer.flush()
    return [*blocks, rest] if rest else blocks


def fields(block: bytes) -> tuple[str, str | None]:
    """(event name, data) of one block as the SSE spec reads it (strict UTF-8: a body
    cut inside a character fails here); data None when the block has no data line."""
    name, data = "", []
    for line in re.split(r"\r\n|\r|\n", block.decode("utf-8")):
        if not line or line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return name, "\n".join(data) if data else None


def parsed(body: bytes, *, terminated: bool = True) -> list[tuple[str, Any]]:
    """(name, data) of every event that has data; data is parsed JSON, or the string
    ``"[DONE]"``. Raises if an event's data is not JSON, and (``terminated``) if the body
    does not end on an event boundary."""
    blocks, rest = frame(body)
    if terminated:
        assert rest == b"", f"the stream does not end on an event boundary: {rest[-200:]!r}"
    elif rest.strip():
        blocks.append(rest)
    out: list[tuple[str, Any]] = []
    for block in blocks:
        name, data = fields(block)
        if data is not None:
            out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out
