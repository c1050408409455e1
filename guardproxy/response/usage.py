"""The usage stage: reads what a response cost, and hands it to the budget leases.

It reads usage from every response shape the dialect knows (JSON ``usage``, OpenAI
``include_usage`` chunks, Anthropic ``message_start`` + ``message_delta``), hides the
usage chunk the proxy itself asked for, and falls back to estimating the streamed
text when a response carries no usage — never zero.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from guardproxy.response.events import Ending
from guardproxy.response.sse import SSEFramer, event_json
from guardproxy.tokens import BYTES_PER_TOKEN

if TYPE_CHECKING:
    from guardproxy.dialects.base import Dialect

log = logging.getLogger("guardproxy.usage")
_JSON_LIMIT = 8 << 20  # larger non-streamed bodies are estimated, not parsed
# Only events that mention usage are parsed; the text of the others is measured from
# the raw JSON string values (escapes count as written: a slight over-estimate).
_USAGE = b'"usage"'
_TEXT = re.compile(rb'"(?:content|text|partial_json|thinking|delta|arguments)"'
                   rb'\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int
    completion: int
    reported: bool = True  # False: estimated by guardproxy


class Tally:
    """What has been read of a response so far (filled in by the dialect)."""

    __slots__ = ("completion", "prompt", "seen", "text_bytes")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self.seen = False
        self.text_bytes = 0

    def report(self, prompt: int | None, completion: int | None) -> None:
        self.seen = True
        if prompt is not None:
            self.prompt = prompt
        if completion is not None:
            self.completion = completion


class Lease(Protocol):
    """A budget reservation that follows the response."""

    async def close(self, usage: Usage, ending: Ending, status: int) -> None: ...


class UsageMeter:
    def __init__(self, dialect: Dialect, leases: list[Lease], prompt_estimate: int,
                 hide_usage_chunk: bool) -> None:
        self.dialect = dialect
        self.leases = leases
        self.prompt_estimate = prompt_estimate
        self.hide_usage_chunk = hide_usage_chunk
        self.tally = Tally()
        self.status = 0
        self.framer: SSEFramer | None = None
        self.body: list[bytes] = []
        self.body_size = 0

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        for name, value in headers:
            if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                self.framer = SSEFramer()

    def chunk(self, data: bytes, final: bool) -> bytes:
        if self.framer is None:
            if self.body_size + len(data) <= _JSON_LIMIT:
                self.body.append(data)
            self.body_size += len(data)
            return data
        out = []
        for block in self.framer.feed(data):
            if _USAGE not in block:
                self.tally.text_bytes += sum(len(m) for m in _TEXT.findall(block))
                out.append(block)
                continue
            name, obj = event_json(block)
            if obj is not None and self.dialect.read_event(name, obj, self.tally) \
                    and self.hide_usage_chunk:
                continue
            out.append(block)
        if final:
            out.append(self.framer.flush())
        return b"".join(out)

    def usage(self) -> Usage:
        if self.framer is None and self.body and self.body_size <= _JSON_LIMIT:
            try:
                obj = json.loads(b"".join(self.body))
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self.dialect.read_json(obj, self.tally)
        if self.tally.seen:
            return Usage(self.tally.prompt, self.tally.completion)
        text = self.tally.text_bytes if self.framer is not None else self.body_size
        return Usage(self.prompt_estimate, -(-text // BYTES_PER_TOKEN), reported=False)

    async def finish(self, ending: Ending) -> None:
        usage = self.usage() if ending is not Ending.DENIED else Usage(0, 0, False)
        for lease in self.leases:
            try:
                await lease.close(usage, ending, self.status)
            except Exception:  # one failing store must not keep others from settling
                log.exception("settling a budget lease failed")
