"""``ResponseDriver``: the one reading of a response that all its stages share.

It decides what the body is from the status and headers (SSE, JSON, other), frames and
parses SSE events once, buffers a JSON body whole (up to a bound) and parses it once,
and runs every stage over each piece in order. A stage that raises is a bug: it is
logged and left out from then on, and the piece goes on as it was before that stage,
so a failing stage can never cut the client's response off. An SSE event larger than
the policy's bound raises ``ResponseAborted`` (the caller ends the response cleanly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from guardproxy.errors import GuardProxyError
from guardproxy.response.chat_chunk import ChunkReader
from guardproxy.response.events import (
    BodyKind,
    Ending,
    Headers,
    ResponseHead,
    ResponseStage,
    SSEEvent,
    WholeBody,
)
from guardproxy.response.sse import EventTooLarge, SSEFramer, ends_event

log = logging.getLogger("guardproxy.response")
JSON_LIMIT = 8 << 20   # larger JSON bodies pass unparsed
_TEXT_TYPES = (b"application/json", b"text/", b"application/x-ndjson")


class ResponseAborted(GuardProxyError):
    """The response had to be ended early (an SSE event over the size bound)."""

    status = 502
    kind = "upstream"


def classify(status: int, headers: Headers) -> ResponseHead:
    ctype = b""
    encoding = b"identity"
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            ctype = value.lower()
        elif lowered == b"content-encoding":
            encoding = value.strip().lower()
    encoded = encoding not in (b"", b"identity")
    text = not encoded and (ctype.startswith(_TEXT_TYPES) or b"+json" in ctype)
    if encoded:
        kind = BodyKind.OTHER
    elif ctype.startswith(b"text/event-stream"):
        kind = BodyKind.EVENTS
    elif ctype.startswith(b"application/json") or b"+json" in ctype.split(b";")[0]:
        kind = BodyKind.JSON
    else:
        kind = BodyKind.OTHER
    return ResponseHead(status, headers, kind, text, encoded)


class ResponseDriver:
    def __init__(self, stages: list[ResponseStage], max_event_bytes: int) -> None:
        self.stages = stages           # every stage, finished at the end
        self.active: list[ResponseStage] = []
        self.max_event_bytes = max_event_bytes
        self.head: ResponseHead | None = None
        self.framer: SSEFramer | None = None
        self.chunks: ChunkReader | None = None  # chat chunk templates (one response's)
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.started = False           # the response's start reached the client
        self.completed = False         # …and its last byte

    @property
    def resizes(self) -> bool:
        """Whether the body may change size (content-length must go)."""
        return bool(self.active) and self.head is not None \
            and self.head.kind is not BodyKind.OTHER

    def start(self, status: int, headers: Headers) -> None:
        self.head = head = classify(status, headers)
        self.active = list(self.stages)
        for stage in self.stages:
            ok, wanted = self._call(stage, stage.start, head)
            if ok and not wanted:
                self.active.remove(stage)
        if head.kind is BodyKind.EVENTS and self.active:
            self.framer = SSEFramer(self.max_event_bytes)
            self.chunks = ChunkReader()

    def body(self, data: bytes, final: bool) -> bytes:
        if final:
            self.completed = True
        head = self.head
        if not self.active or head is None:
            if self.framer is not None:  # the last stage failed: what the framer holds goes too
                data, self.framer = self.framer.flush() + data, None
            return data
        if head.kind is BodyKind.EVENTS:
            return self._events(data, final)
        if head.kind is BodyKind.JSON and self.buffered + len(data) <= JSON_LIMIT:
            self.buffer.append(data)
            self.buffered += len(data)
            if not final:
                return b""
            body = WholeBody(b"".join(self.buffer))
            self.buffer.clear()
            for stage in list(self.active):
                before = body.out
                if not self._call(stage, stage.whole, body)[0]:
                    body.restore(before)
            return body.output()
        # other bodies, and JSON too large to hold: passed on, sizes counted
        held, self.buffer = b"".join(self.buffer), []
        self.buffered = JSON_LIMIT + 1  # from here on, passed through
        size = len(held) + len(data)
        for stage in list(self.active):
            self._call(stage, stage.other, size)
        return held + data if held else data

    def _events(self, data: bytes, final: bool) -> bytes:
        assert self.framer is not None
        try:
            blocks = self.framer.feed(data)
        except EventTooLarge as exc:
            raise ResponseAborted(str(exc)) from None
        chunks = self.chunks
        events = [SSEEvent(block, True, chunks) for block in blocks]
        if final:
            tail = self.framer.flush()
            if tail.strip():
                events.append(SSEEvent(tail, terminated=False))
            elif tail:
                events.append(SSEEvent(tail))  # stray line breaks: passed as they came
        out = []
        stages = list(self.active)  # taken again only when a stage fails
        for event in events:
            for stage in stages:
                if event.out == b"":   # dropped
                    break
                out_before, before = event.out, event.before
                try:
                    stage.event(event)
                except Exception:
                    self._failed(stage)
                    event.restore(out_before, before)
            if len(stages) != len(self.active):
                stages = list(self.active)
            body = event.raw if event.out is None else event.out   # event.output()
            out.append(event.before + body if event.before else body)
        if final:
            extras = []
            for stage in list(self.active):
                ok, extra = self._call(stage, stage.end)
                if ok and extra:
                    extras.append(extra)
            last = out[-1] if out else b""
            if extras and last and not ends_event(last):  # the upstream cut its last event
                out.append(b"\n" if last.endswith(b"\n") else b"\n\n")
            out += extras
        return b"".join(out)

    def _call(self, stage: ResponseStage, method: Callable[..., Any],
              *args: Any) -> tuple[bool, Any]:
        """Run one stage hook: (True, its result), or (False, None) when it raised —
        then it is logged and left out for the rest of the response."""
        try:
            return True, method(*args)
        except Exception:
            self._failed(stage)
            return False, None

    def _failed(self, stage: ResponseStage) -> None:
        """Log a stage that raised (from inside ``except``) and leave it out from now on."""
        log.exception("response stage %s failed; the rest of the response passes "
                      "without it", type(stage).__name__)
        if stage in self.active:
            self.active.remove(stage)

    async def finish(self, ending: Ending) -> None:
        for stage in self.stages:
            try:
                await stage.finish(ending)
            except Exception:  # one failing stage must not keep the others from settling
                log.exception("response stage %s failed to finish", type(stage).__name__)
