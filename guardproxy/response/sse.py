"""Server-sent events framing that never re-encodes: events are cut out of the byte
stream as they are (``\\n\\n`` or ``\\r\\n\\r\\n`` terminated) so anything a stage does
not change reaches the client byte-identical."""

from __future__ import annotations

import json
from typing import Any


class SSEFramer:
    """Splits a byte stream into whole events; holds back only a trailing partial event."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.pending + data if self.pending else data
        events = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            crlf = buf.find(b"\r\n\r\n", start)
            if crlf != -1 and (end == -1 or crlf < end):
                end, size = crlf, 4
            else:
                size = 2
            if end == -1:
                break
            events.append(buf[start:end + size])
            start = end + size
        self.pending = buf[start:]
        return events

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


def event_fields(block: bytes) -> tuple[str, str]:
    """(event name, data) of one event block; data lines are joined with newlines."""
    name = ""
    data: list[str] = []
    for raw in block.decode("utf-8", "replace").splitlines():
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
