"""The usage stage: reads what a response cost, and hands it to the budget leases.

It reads usage from every response shape the dialect knows (JSON ``usage``, OpenAI
``include_usage`` chunks, Anthropic ``message_start`` + ``message_delta``), hides the
usage chunk the proxy itself asked for, and falls back to estimating the text the
client received when a response carries no final usage — never zero for text.

Counts are merged, never overwritten: a later event with a smaller or zero field (an
Anthropic ``message_delta`` with ``input_tokens: 0``, as SGLang sends) cannot lower what
an earlier one reported, and a reported output of 0 beside streamed text is estimated.
A body the proxy cannot read (a non-text body such as audio, an unknown
content-encoding) without reported usage is charged the whole output cap reserved,
never by its byte size.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from guardproxy.response.events import (
    BaseStage,
    Ending,
    ResponseHead,
    SSEEvent,
    WholeBody,
)
from guardproxy.tokens import BYTES_PER_TOKEN

if TYPE_CHECKING:
    from guardproxy.dialects.base import Dialect

log = logging.getLogger("guardproxy.usage")
# Only events that mention usage are parsed here; the text of the others is measured
# from the raw JSON string values (escapes count as written: a slight over-estimate).
_USAGE = b'"usage"'
_TEXT = re.compile(rb'"(?:content|text|partial_json|thinking|delta|arguments|refusal)"'
                   rb'\s*:\s*"((?:[^"\\]++|\\.)*+)"')


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int
    completion: int
    reported: bool = True  # False: estimated by guardproxy


class Tally:
    """What has been read of a response so far (filled in by the dialect). Each count
    only grows. ``completion`` is the largest count that covers the whole answer (an
    OpenAI usage chunk, an Anthropic ``message_delta``), ``floor`` the largest partial
    one (``message_start``); ``final`` says whether a whole-answer count was seen."""

    __slots__ = ("completion", "final", "floor", "prompt", "prompt_seen", "seen",
                 "text_bytes")

    def __init__(self) -> None:
        self.prompt = 0
        self.prompt_seen = False
        self.completion = 0
        self.floor = 0
        self.final = False
        self.seen = False
        self.text_bytes = 0

    def report(self, prompt: int | None, completion: int | None, final: bool = True) -> None:
        self.seen = True
        if prompt is not None and prompt >= 0:
            self.prompt = max(self.prompt, prompt)
            self.prompt_seen = True
        if completion is not None and completion >= 0:
            if final:
                self.completion = max(self.completion, completion)
                self.final = True
            else:
                self.floor = max(self.floor, completion)


class Lease(Protocol):
    """A budget reservation that follows the response; ``ttl`` in seconds."""

    ttl: float

    async def renew(self) -> None: ...

    async def close(self, usage: Usage, ending: Ending, status: int) -> None: ...


class GroupLease(Lease, Protocol):
    """A lease that can close together with others of its type (budget leases: one
    store call for all of a request's)."""

    async def close_all(self, leases: Sequence[Lease], usage: Usage, ending: Ending,
                        status: int) -> None:
        """Close ``leases`` (of this lease's type, this one among them) as ``close``
        closes one."""


async def close_leases(leases: Sequence[Lease], usage: Usage, ending: Ending,
                       status: int) -> None:
    """Close a request's leases: those of one ``GroupLease`` type together, the others
    one by one. One that fails is logged and does not keep the others from settling."""
    if not leases:
        return
    groups: dict[type, list[Lease]] = {}
    for lease in leases:
        groups.setdefault(type(lease), []).append(lease)
    for group in groups.values():
        head = group[0]
        # a method lookup, not isinstance(head, GroupLease): a runtime Protocol check
        # costs ~20 µs, on every request
        close_all = getattr(head, "close_all", None)
        closes = ([functools.partial(close_all, group)] if close_all is not None
                  else [lease.close for lease in group])
        for close in closes:
            try:
                await close(usage, ending, status)
            except Exception:  # one failing store must not keep others from settling
                log.exception("settling budget leases failed")


class UsageMeter(BaseStage):
    def __init__(self, dialect: Dialect, leases: list[Lease], prompt_estimate: int,
                 hide_usage_chunk: bool, reserved_output: int) -> None:
        self.dialect = dialect
        self.leases = leases
        self.prompt_estimate = prompt_estimate
        self.hide_usage_chunk = hide_usage_chunk
        self.reserved_output = reserved_output
        self.tally = Tally()
        self.head: ResponseHead | None = None
        self.other_bytes = 0
        self.blind = False      # something could not be read: charge what was reserved

    def start(self, head: ResponseHead) -> bool:
        self.head = head
        return True

    def event(self, event: SSEEvent) -> None:
        if _USAGE not in event.raw:
            self.tally.text_bytes += sum(map(len, _TEXT.findall(event.raw)))
            return
        chunk = event.chunk   # a chat chunk with "usage": null each time: no parse
        if chunk is not None:
            read = self.dialect.read_chunk(chunk, self.tally)
            if read is not None:
                if read and self.hide_usage_chunk:
                    event.drop()
                return
        obj = event.json
        if obj is None and event.data.lstrip().startswith(("{", "[")):
            self.blind = True  # usage we cannot read is charged as the worst case
        if isinstance(obj, dict) and self.dialect.read_event(event.name, obj, self.tally) \
                and self.hide_usage_chunk:
            event.drop()

    def whole(self, body: WholeBody) -> None:
        obj = body.json
        if obj is None and body.raw.strip():
            self.blind = True
        if isinstance(obj, dict):
            self.dialect.read_json(obj, self.tally)
        if not self.tally.final or not self.tally.completion:
            self.tally.text_bytes += sum(len(m) for m in _TEXT.findall(body.raw))

    def other(self, size: int) -> None:
        self.other_bytes += size

    def usage(self) -> Usage:
        t, head = self.tally, self.head
        # usage that says 0 tokens came out beside text that did is no report at all
        bogus = t.final and not t.completion and t.text_bytes > 0
        prompt = t.prompt if t.prompt_seen and not bogus else self.prompt_estimate
        if t.final and not bogus:
            return Usage(prompt, max(t.completion, t.floor))
        if self.blind or (head is not None and not head.text):
            # audio, images, unknown encodings: the size says nothing of tokens, and the
            # upstream may have generated all it was allowed to
            completion = self.reserved_output
        elif self.other_bytes:  # text passed unparsed (too large to hold)
            completion = -(-self.other_bytes // BYTES_PER_TOKEN)
        else:
            completion = -(-t.text_bytes // BYTES_PER_TOKEN)
        return Usage(prompt, max(t.floor, completion), reported=False)

    async def finish(self, ending: Ending) -> None:
        usage = self.usage() if self.head is not None else Usage(0, 0, False)
        status = self.head.status if self.head is not None else 0
        await close_leases(self.leases, usage, ending, status)
