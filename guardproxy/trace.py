"""One guarded request's trace: what the client was sent, when, and how it ended,
turned into the ``observe.RequestRecord`` every observer's ``completed`` gets.

    trace = Trace(exchange)
    send = trace.wrap(send)            # counts status, bytes and the first body byte
    trace.forwarding()                 # just before the request goes upstream
    trace.ended(ending, admission)     # when the response is over
    observer.completed(trace.record(pipeline))

Times come from ``time.perf_counter`` (durations) and ``time.time`` (the record's
``time``: when the request ended).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.types import Message, Send

from guardproxy.guards.budget import SETTLED
from guardproxy.guards.per import CLUSTER
from guardproxy.observe import Decision, RequestRecord
from guardproxy.response.events import Ending

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.flow import Admission, Pipeline

CANARY_KEY = "canary_key_id"      # exchange.notes: the key that marked the response
LEDGER_ENTRY = "ledger_entry_id"  # exchange.notes: the ledger entry of its text
AUDIT_INCLUDE = "audit_include"   # exchange.notes: text fields a matching rule opted in
RESPONSE_TEXT = "response_text"   # exchange.notes: the text the client got, when asked
MAX_MODEL = 256    # characters of a client-chosen model name a record keeps
MAX_PATH = 2048
BYTES_IN = "bytes_in"             # exchange.notes: the request body as the client sent it


class Trace:
    __slots__ = (
        "admission",
        "arrived",
        "bytes_out",
        "ending",
        "exchange",
        "first_byte",
        "status",
        "t0",
        "upstream_at",
        "upstream_end",
    )

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.arrived = time.time()
        self.t0 = time.perf_counter()
        self.status = 0
        self.bytes_out = 0
        self.first_byte: float | None = None
        self.upstream_at: float | None = None
        self.upstream_end: float | None = None
        self.ending = Ending.DENIED
        self.admission: Admission | None = None

    def wrap(self, send: Send) -> Send:
        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
            elif message["type"] == "http.response.body":
                self.bytes_out += len(message.get("body", b""))
            await send(message)

        return counted

    def forwarding(self, admission: Admission) -> None:
        self.admission = admission
        self.upstream_at = time.perf_counter()

    def upstream_body(self, size: int) -> None:
        """A body chunk of the upstream's response is on its way to the client."""
        if size and self.first_byte is None:
            self.first_byte = time.perf_counter()

    def ended(self, ending: Ending) -> None:
        self.ending = ending
        self.upstream_end = time.perf_counter()

    def record(self, pipeline: Pipeline, admission: Admission | None = None) -> RequestRecord:
        ex = self.exchange
        admission = admission or self.admission
        account = ex.account
        settled: dict[str, tuple[int, int]] = ex.notes.get(SETTLED, {})
        timed = admission.seconds if admission is not None else {}
        decisions = tuple(
            Decision(o.rule, "shadow" if o.shadow else "enforce", o.allowed, o.window,
                     reserved=settled.get(o.rule, (None, None))[0],
                     charged=settled.get(o.rule, (None, None))[1], seconds=timed.get(o.rule))
            for o in (admission.decisions if admission is not None else ()))
        cluster = ex.notes.get(CLUSTER)
        include: frozenset[str] = ex.notes.get(AUDIT_INCLUDE, frozenset())
        if pipeline.policy.audit is not None:
            include = include | set(pipeline.policy.audit.include)
        upstream = ttfb = None
        if self.upstream_at is not None:
            end = self.upstream_end if self.upstream_end is not None else time.perf_counter()
            upstream = end - self.upstream_at
            if self.first_byte is not None:
                ttfb = self.first_byte - self.upstream_at
        bytes_in = ex.notes.get(BYTES_IN)
        if bytes_in is None:   # streamed through unread: what the client declared
            length = ex.headers.get("content-length", "")
            # ASCII digits only, bounded: str.isdigit() takes '²', and int() of 5,000
            # digits raises (the request would go unrecorded)
            ok = length.isascii() and length.isdigit() and len(length) <= 19
            bytes_in = int(length) if ok else 0
        ending = self.ending
        if self.status == 0 and ending is Ending.DENIED:
            ending = Ending.CANCELLED   # nothing was sent: the client went away first
        return RequestRecord(
            # when it ended, as access logs stamp a line: the trail is then in time
            # order (lines are written as requests end); it arrived duration earlier
            time=time.time(), request_id=ex.request_id, method=ex.method,
            path=_capped(ex.path, MAX_PATH) or "",
            route=pipeline.dialect.endpoint(ex.path) or "other" if ex.path else "other",
            dialect=pipeline.dialect.name, status=self.status, ending=ending.value,
            account=account.id if account else None, org=account.org if account else None,
            tier=account.tier if account else None,
            cluster=cluster.id if cluster is not None else None,
            client_ip=ex.client_ip, model=_capped(ex.model, MAX_MODEL), decisions=decisions,
            tokens_reserved=max((r for r, _ in settled.values()), default=0),
            tokens_settled=max((c for _, c in settled.values()), default=0),
            upstream_seconds=upstream, ttfb_seconds=ttfb,
            duration_seconds=time.perf_counter() - self.t0,
            bytes_in=bytes_in, bytes_out=self.bytes_out,
            canary_key_id=ex.notes.get(CANARY_KEY), ledger_entry_id=ex.notes.get(LEDGER_ENTRY),
            prompt=_prompt(ex) if "prompt" in include else None,
            response=ex.notes.get(RESPONSE_TEXT) if "response" in include else None)


def _capped(text: str | None, limit: int) -> str | None:
    """A client-chosen string as records keep it: at most ``limit`` characters (a
    15 MB model name must not make a 15 MB audit line and rotate the history away)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"…(+{len(text) - limit} characters)"


def _prompt(ex: Exchange) -> str | None:
    from guardproxy.linkage.enricher import prompt_text  # the one reading of a prompt

    return prompt_text(ex.json, limit=64 * 1024)
