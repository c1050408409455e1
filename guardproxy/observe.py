"""Observers see what the guards decide and what budgets charge, enforced and shadow.

``Pipeline`` calls every observer for every outcome that denies (enforced or shadow),
every settle with what was charged, and every state-store error; the middleware calls
``completed`` once per guarded request when it is over (answered, denied, failed or
abandoned) with a ``RequestRecord``. Audit trails (``guardproxy.audit``) and metrics
(``guardproxy.metrics``) plug in here; ``LogObserver`` logs one structured line per
denial and per shadow denial, so operators can see what shadow rules would do.
Observers must not block: they run on the event loop, inside the request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.guards.base import Outcome
    from guardproxy.response.events import Ending

log = logging.getLogger("guardproxy.decisions")


@dataclass(frozen=True, slots=True)
class Decision:
    """One rule's verdict on a request. ``mode``: ``enforce`` | ``shadow``; ``window``:
    the limit that decided a denial (``"20/minute"``), else ""; ``reserved`` /
    ``charged``: a budget rule's tokens (None for other kinds or before settling)."""

    rule: str
    mode: str
    allowed: bool
    window: str = ""
    reserved: int | None = None
    charged: int | None = None
    seconds: float | None = None   # time in the rule's calls: its state-store round trips

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "mode": self.mode, "allowed": self.allowed}
        if self.window:
            out["window"] = self.window
        if self.reserved is not None:
            out["reserved"] = self.reserved
            out["charged"] = self.charged
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 6)
        return out


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Everything known about one guarded request once it is over; times are unix
    seconds (``time``: when it ended, ``duration_seconds`` after it arrived), durations
    seconds (None: never reached), sizes bytes.

    ``status``: what the client was sent (0: nothing, it went away first); ``ending``:
    ``response.events.Ending`` value (``completed``, ``denied``, ``upstream_failed``,
    ``truncated``, ``disconnected``, ``cancelled``); ``route``: the dialect's endpoint
    kind (``chat``, ``messages``, …) or ``other``; ``tokens_reserved`` /
    ``tokens_settled``: the largest of the budget rules' (0 without budgets);
    ``upstream_seconds``: from forwarding to the response's end; ``ttfb_seconds``: to
    its first body byte; ``prompt`` / ``response``: only when a matching rule opts in
    (``audit: {include: [prompt]}``; no stage keeps the response text yet), else None."""

    time: float
    request_id: str
    method: str
    path: str
    route: str
    dialect: str
    status: int
    ending: str
    account: str | None = None
    org: str | None = None
    tier: str | None = None
    cluster: str | None = None
    client_ip: str = ""
    model: str | None = None
    decisions: tuple[Decision, ...] = ()
    tokens_reserved: int = 0
    tokens_settled: int = 0
    upstream_seconds: float | None = None
    ttfb_seconds: float | None = None
    duration_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    canary_key_id: str | None = None
    ledger_entry_id: str | None = None
    prompt: str | None = None
    response: str | None = None


class Observer(Protocol):
    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        """A guard's outcome for a request (every outcome that is not a plain allow)."""

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        """A budget lease closed: ``reserved`` and ``charged`` in the rule's tokens."""

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        """A state-store call failed for ``rule``."""

    def completed(self, record: RequestRecord) -> None:
        """A guarded request is over (see ``RequestRecord``)."""


class NullObserver:
    """An observer that ignores everything: subclass it and override what you need."""

    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        pass

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        pass

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        pass

    def completed(self, record: RequestRecord) -> None:
        pass


class Observers:
    """Fans every call out to several observers; one that raises is logged, not fatal."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        for o in self.observers:
            try:
                o.decision(exchange, outcome)
            except Exception:
                log.exception("observer failed")

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        for o in self.observers:
            try:
                o.settled(exchange, rule, reserved, charged, ending)
            except Exception:
                log.exception("observer failed")

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        for o in self.observers:
            try:
                o.store_error(exchange, rule, error)
            except Exception:
                log.exception("observer failed")

    def completed(self, record: RequestRecord) -> None:
        for o in self.observers:
            try:
                # observers written before ``completed`` existed need not have it
                done = getattr(o, "completed", None)
                if done is not None:
                    done(record)
            except Exception:
                log.exception("observer failed")


class LogObserver:
    """One JSON log line per denial and per shadow denial, at INFO on
    ``guardproxy.decisions``: ``{"event": "deny"|"shadow_deny", "rule", "account",
    "window", "status", "request_id"}``. Settles are logged at DEBUG."""

    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        if outcome.allowed:
            return
        log.info(json.dumps({
            "event": "shadow_deny" if outcome.shadow else "deny",
            "rule": outcome.rule,
            "account": exchange.account.id if exchange.account else None,
            "window": outcome.window, "status": outcome.status,
            "request_id": exchange.request_id}))

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(json.dumps({"event": "settle", "rule": rule, "reserved": reserved,
                                  "charged": charged, "ending": ending.value,
                                  "request_id": exchange.request_id}))

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        log.warning(json.dumps({"event": "store_error", "rule": rule, "error": str(error),
                                "request_id": exchange.request_id if exchange else None}))

    def completed(self, record: RequestRecord) -> None:
        pass   # the audit trail's job
