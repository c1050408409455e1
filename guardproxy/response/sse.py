"""Server-sent events framing that never re-encodes: events are cut out of the byte
stream as they are, so anything a stage does not change reaches the client
byte-identical.

An event ends at a blank line; lines end in CRLF, LF or CR and in nothing else
(the SSE spec: U+2028, U+2029 and U+0085 inside data are text, not line breaks).
Cost is linear in the stream: the framer remembers how far it has searched, so one
large event arriving in many reads is scanned once. An event larger than the bound
raises ``EventTooLarge``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_EOL = re.compile(rb"\r\n|\r|\n")
_LINE = re.compile(r"\r\n|\r|\n")


class EventTooLarge(Exception):
    """One SSE event exceeded ``max_event_bytes`` without ending."""


class SSEFramer:
    """Splits a byte stream into whole events; holds back only a trailing partial event."""

    __slots__ = ("buffer", "lf", "limit", "line", "pos")

    def __init__(self, max_event_bytes: int = 4 << 20) -> None:
        self.buffer = bytearray()
        self.pos = 0           # every line end before this offset has been read
        self.line = 0          # where the current line starts
        self.limit = max_event_bytes
        self.lf = True         # the buffer holds no CR: lines end in LF only

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buffer
        lf = self.lf and b"\r" not in data
        if not buf and lf and data.find(b"\n\n") == len(data) - 2 > 0 and data[0] != 0x0A:
            return [data]  # the common read: exactly one whole LF-framed event
        buf += data
        if lf:
            events, start, line, pos = _lf_events(buf, self.line, self.pos)
        else:
            events, start, line, pos = self._events(buf)
        if start:
            del buf[:start]
            line, pos = line - start, pos - start
        self.line, self.pos = line, pos
        self.lf = lf or not buf   # a CR in what is held keeps the general reading
        if len(buf) > self.limit:
            raise EventTooLarge(f"an SSE event exceeded {self.limit} bytes")
        return events

    def _events(self, buf: bytearray) -> tuple[list[bytes], int, int, int]:
        """Any line ends: (events, where the rest starts, line, pos) read line by line."""
        events: list[bytes] = []
        start, line, pos = 0, self.line, self.pos
        while True:
            found = _EOL.search(buf, pos)
            if found is None:
                pos = len(buf)
                break
            if found.end() == len(buf) and buf[found.start()] == 0x0D:
                pos = found.start()   # CR or CRLF: the next read tells
                break
            if found.start() == line:  # an empty line ends the event
                events.append(bytes(buf[start:found.end()]))
                start = found.end()
            line = pos = found.end()
        return events, start, line, pos

    def flush(self) -> bytes:
        """What is left: an event the stream ended without terminating, or nothing."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        self.line = self.pos = 0
        self.lf = True
        return rest


def _lf_events(buf: bytearray, line: int, pos: int) -> tuple[list[bytes], int, int, int]:
    """``SSEFramer._events`` of a buffer with no CR, an event at a time: after a line
    that is not empty, the event ends at the next ``\\n\\n`` (scanned in C)."""
    events: list[bytes] = []
    start = 0
    while True:
        end = buf.find(b"\n", pos)
        if end < 0:
            return events, start, line, len(buf)
        if end == line:   # an empty line: the event ends here
            events.append(bytes(buf[start:end + 1]))
            start = line = pos = end + 1
            continue
        pair = buf.find(b"\n\n", end)   # the next empty line's end is its second LF
        if pair < 0:
            return events, start, buf.rfind(b"\n", end) + 1, len(buf)
        events.append(bytes(buf[start:pair + 2]))
        start = line = pos = pair + 2


def ends_event(data: bytes) -> bool:
    """Whether ``data`` ends with a blank line (so more bytes start a new event)."""
    for eol in (b"\r\n", b"\n", b"\r"):
        if data.endswith(eol):
            rest = data[:-len(eol)]
            return not rest or rest.endswith((b"\n", b"\r"))
    return False


def event_fields(block: bytes) -> tuple[str, str]:
    """(event name, data) of one event block; data lines are joined with newlines."""
    if block.startswith(b"data:") and block.count(b"\n") == 2 and block.endswith(b"\n\n") \
            and b"\r" not in block:  # the common event: one data line
        value = block[5:-2].decode("utf-8", "replace")
        return "", value[1:] if value.startswith(" ") else value
    name = ""
    data: list[str] = []
    for raw in _LINE.split(block.decode("utf-8", "replace")):
        field, _, value = raw.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return name, "\n".join(data)


def event_json(block: bytes) -> tuple[str, Any]:
    """(event name, parsed JSON data or None)."""
    name, data = event_fields(block)
    if not data or data == "[DONE]":
        return name, None
    try:
        return name, json.loads(data)
    except ValueError:
        return name, None


def encode_event(name: str, obj: Any) -> bytes:
    """One event, as upstreams write them (the name line only when named)."""
    head = f"event: {name}\n" if name else ""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"{head}data: {data}\n\n".encode("utf-8", "surrogatepass")
