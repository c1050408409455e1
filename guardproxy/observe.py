"""Observers see what the guards decide and what budgets charge, enforced and shadow.

``Pipeline`` calls every observer for every outcome that denies (enforced or shadow),
every settle with what was charged, and every state-store error. Audit trails and
metrics plug in here; the first observer is ``LogObserver``: one structured log line
per denial and per shadow denial, so operators can see what shadow rules would do.
Observers must not block: they run on the event loop, inside the request.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.guards.base import Outcome
    from guardproxy.response.events import Ending

log = logging.getLogger("guardproxy.decisions")


class Observer(Protocol):
    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        """A guard's outcome for a request (every outcome that is not a plain allow)."""

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        """A budget lease closed: ``reserved`` and ``charged`` in the rule's tokens."""

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        """A state-store call failed for ``rule``."""


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
