"""What one rule would decide on one request, and why: the shape every guard's
``explain`` returns (no project imports at run time: the guards import this module).

``decision`` is ``"allow"``, ``"deny"`` or ``"none"`` (the rule has nothing to say:
its ``when:`` does not match, or the request is not of the kind it acts on). A shadow
rule's denial is ``"deny"`` with ``mode: "shadow"``: reported, never enforced.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.policy.match import Match
    from guardproxy.policy.model import Rule

ALLOW, DENY, NONE = "allow", "deny", "none"


@dataclass(frozen=True)
class RuleExplanation:
    """``status``: the HTTP status of a denial (429 limits, 403 linkage, 400 a request
    the rule cannot take, 503 a store error under ``on_store_error: deny``).
    ``window``: the window or setting that decided (``"2 per 1 minute"``).
    ``marks``: the response would be rewritten (an enforced canary). ``detail``:
    the kind's own facts (counter ``key``, ``windows``, ``cluster``, …), merged into
    the JSON entry."""

    rule: Rule
    matches: bool
    decision: str
    why: str
    status: int | None = None
    window: str = ""
    marks: bool = False
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def enforced_denial(self) -> bool:
        return self.decision == DENY and not self.rule.shadow

    def as_dict(self) -> dict[str, Any]:
        """``{"name", "kind", "mode", "matches", "decision", "why", ...}``."""
        out: dict[str, Any] = {"name": self.rule.name, "kind": self.rule.kind,
                               "mode": self.rule.mode, "matches": self.matches,
                               "decision": self.decision, "why": self.why}
        if self.status is not None:
            out["status"] = self.status
        if self.window:
            out["window"] = self.window
        if self.marks:
            out["marks"] = True
        out.update(self.detail)
        return out


def skipped(rule: Rule, why: str) -> RuleExplanation:
    return RuleExplanation(rule, matches=False, decision=NONE, why=why)


def allowed(rule: Rule, why: str, *, marks: bool = False, **detail: Any) -> RuleExplanation:
    return RuleExplanation(rule, matches=True, decision=ALLOW, why=why, marks=marks,
                           detail=detail)


def denied(rule: Rule, why: str, status: int, window: str = "",
           **detail: Any) -> RuleExplanation:
    if rule.shadow:
        why += " (shadow: reported, not enforced)"
    return RuleExplanation(rule, matches=True, decision=DENY, why=why, status=status,
                           window=window, detail=detail)


def when_mismatch(when: Match | None, exchange: Exchange) -> str | None:
    """Why ``when:`` does not match the request, or None when it does (or is absent).
    Header values are never quoted: a header may hold a credential."""
    if when is None:
        return None
    attrs = exchange.attrs()
    for name, pattern in when.fields:
        if not pattern(attrs.get(name)):
            return f"when.{name} does not match the request's {name} {attrs.get(name)!r}"
    for name, pattern in when.headers:
        if not pattern(exchange.headers.get(name)):
            return f"when.header {name!r} does not match the request's header"
    return None


def resets_in(reset_at: float, now: float | None = None) -> str:
    """``"resets in 42s"`` from a unix time (the store's clock when ``now`` is given)."""
    left = max(0.0, reset_at - (time.time() if now is None else now))
    return f"resets in {left:.0f}s"
