"""What response stages see, and the interface every stage implements.

A guard that needs the response (a budget settling real usage, a canary marking text,
later the extraction monitors) returns a ``ResponseStage`` in its ``Outcome``. One
``ResponseDriver`` (``driver.py``) feeds all of a response's stages from a single
reading of it: SSE events are framed and parsed once and shared (``SSEEvent``), a JSON
body is buffered and parsed once (``WholeBody``), anything else passes as bytes.
``finish`` is called exactly once per stage, with how the exchange ended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from guardproxy.response.chat_chunk import ChatChunk, ChunkReader
from guardproxy.response.sse import encode_event, event_fields

Headers = list[tuple[bytes, bytes]]
_UNPARSED: Any = object()


class Ending(Enum):
    COMPLETED = "completed"          # the whole response reached the client
    DENIED = "denied"                # a guard refused the request; nothing was forwarded
    CANCELLED = "cancelled"          # the client left before any of the response
    UPSTREAM_FAILED = "upstream_failed"  # no response: the client got an error instead
    TRUNCATED = "truncated"          # the upstream broke off mid-response (or overran a bound)
    DISCONNECTED = "disconnected"    # the client left mid-response


class BodyKind(Enum):
    EVENTS = "events"    # text/event-stream: stages see SSEEvents
    JSON = "json"        # buffered whole and parsed once: stages see a WholeBody
    OTHER = "other"      # audio, images, unknown encodings…: stages see only sizes


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers
    kind: BodyKind
    text: bool           # a text body (JSON, SSE, text/*): its size says something of tokens
    encoded: bool        # a content-encoding the proxy cannot read


class SSEEvent:
    """One event as framed (``raw``), parsed at most once however many stages read it.
    A stage changes what the client gets with ``replace``/``drop``/``insert_before``
    (or ``set_out``). A chat chunk can also be read without its parse: ``chunk``."""

    __slots__ = ("_chunk", "_chunk_of", "_data", "_json", "_lent", "_name", "_reader",
                 "before", "out", "raw", "terminated")

    def __init__(self, raw: bytes, terminated: bool = True,
                 reader: ChunkReader | None = None) -> None:
        self.raw = raw
        self.terminated = terminated    # False: the stream ended inside this event
        self.out: bytes | None = None   # None: unchanged; b"": dropped
        self.before = b""
        self._name: str | None = None
        self._data = ""
        self._json: Any = _UNPARSED
        self._lent = False              # a stage holds the parse (and may have changed it)
        self._reader = reader           # the response's chunk templates, if any
        self._chunk: ChatChunk | None = None
        self._chunk_of: bytes | None = None  # the bytes ``_chunk`` was read from

    def _fields(self) -> None:
        if self._name is None:
            self._name, self._data = event_fields(self.raw if self.out is None else self.out)

    @property
    def name(self) -> str:
        self._fields()
        assert self._name is not None
        return self._name

    @property
    def data(self) -> str:
        self._fields()
        return self._data

    @property
    def json(self) -> Any:
        """The data as JSON (parsed on first use), or None."""
        self._lent = True
        return self._parse()

    @property
    def chunk(self) -> ChatChunk | None:
        """The event as a chat chunk read without its parse (``chat_chunk``), or None:
        not such a chunk, no template for it yet, or a stage already holds the parse
        (which it may have changed). A stage that gets a chunk reads nothing else of the
        event; one that changes its text does so with ``set_out``."""
        reader = self._reader
        if reader is None or self._lent:
            return None
        current = self.raw if self.out is None else self.out
        if self._chunk_of is current:
            return self._chunk
        chunk = reader.read(current)
        if chunk is None and self.out is None and reader.learning:
            # the parse the stages would make anyway (kept for them), read once more
            chunk = reader.learn(current, self._parse())
        self._chunk, self._chunk_of = chunk, current
        return chunk

    def _parse(self) -> Any:
        if self._json is _UNPARSED:
            data = self.data
            try:
                self._json = json.loads(data) if data and data != "[DONE]" else None
            except (ValueError, RecursionError):  # deep nesting: unreadable, not fatal
                self._json = None
        return self._json

    @property
    def dropped(self) -> bool:
        return self.out == b""

    def replace(self, obj: Any) -> None:
        """Send ``obj`` (the event's JSON, changed) instead of the upstream's bytes."""
        self.out = encode_event(self.name, obj)

    def set_out(self, data: bytes) -> None:
        """Send ``data`` instead; the event is read again from it when next asked."""
        self.out = data
        self._name, self._json, self._lent = None, _UNPARSED, False

    def drop(self) -> None:
        self.out = b""

    def insert_before(self, data: bytes) -> None:
        self.before += data

    def output(self) -> bytes:
        body = self.raw if self.out is None else self.out
        return self.before + body if self.before else body

    def restore(self, out: bytes | None, before: bytes) -> None:
        """Undo a stage that failed: its bytes, and its changes to the shared parse
        (read again, from the bytes as they now are, when next asked for)."""
        self.out, self.before = out, before
        self._name, self._json, self._lent, self._chunk_of = None, _UNPARSED, False, None


class WholeBody:
    """A non-streamed JSON body, buffered whole; parsed at most once."""

    __slots__ = ("_json", "out", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.out: bytes | None = None
        self._json: Any = _UNPARSED

    @property
    def json(self) -> Any:
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.raw if self.out is None else self.out)
            except (ValueError, RecursionError):  # deep nesting: unreadable, not fatal
                self._json = None
        return self._json

    def restore(self, out: bytes | None) -> None:
        """Undo a stage that failed: its bytes and its changes to the shared parse."""
        self.out, self._json = out, _UNPARSED

    def replace(self, obj: Any) -> None:
        self.out = json.dumps(obj, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8", "surrogatepass")

    def output(self) -> bytes:
        return self.raw if self.out is None else self.out


class ResponseStage(Protocol):
    def start(self, head: ResponseHead) -> bool:
        """The response's status and headers, before they are sent; False when the
        stage has nothing to do with this response (it is still finished)."""
        ...

    def event(self, event: SSEEvent) -> None:
        """See (and possibly change) one stream event."""
        ...

    def end(self) -> bytes:
        """The stream is ending: events to send before its end (held-back text)."""
        ...

    def whole(self, body: WholeBody) -> None:
        """See (and possibly change) a whole JSON body."""
        ...

    def other(self, size: int) -> None:
        """``size`` more bytes of a body the driver does not parse passed."""
        ...

    async def finish(self, ending: Ending) -> None:
        """Settle whatever the stage holds; called exactly once."""
        ...


class BaseStage:
    """Defaults for stages that need only some of the hooks."""

    def start(self, head: ResponseHead) -> bool:
        return True

    def event(self, event: SSEEvent) -> None:
        return None

    def end(self) -> bytes:
        return b""

    def whole(self, body: WholeBody) -> None:
        return None

    def other(self, size: int) -> None:
        return None

    async def finish(self, ending: Ending) -> None:
        return None
