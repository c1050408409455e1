"""``budget:`` — token budgets, reserved before the call and settled after it.

    - name: daily-tokens
      budget: 2000000/day; 50000000/month
      count: total              # prompt | completion | total | {prompt: 1, completion: 4}
      per: account
      on_exhausted: reject      # reject | clamp (shrink max_tokens to what is left)
      min_tokens: 16            # clamp never goes below this; less left -> reject
      default_max_tokens: 1024  # written into requests that name no limit

Before forwarding, the estimated prompt plus the request's output cap times the
completions it asks for (``n``, ``best_of``, several prompts) is reserved in every
window at once (one atomic store call), and that cap is written into every body field
the upstream may read it from (``upstream.cap_field``). While the response streams the
lease is renewed; after it, the reservation is settled with the reported usage:

- completed: the usage the upstream reported (or, without usage, an estimate of the
  text the client received);
- the upstream broke off mid-response: what was streamed to the client;
- the client disconnected mid-response: the whole reservation (the upstream may have
  generated all of it, and guardproxy stops reading, so the reservation is the honest
  upper bound);
- nothing was generated (denied, cancelled before the response, upstream failed, an
  error answer without usage): nothing.
All of a request's budget leases settle in one store call (on Redis Cluster one per
hash slot, concurrently); a settle that fails is retried from a bounded queue
(``state.settles``), lease by lease.

``per: cluster``: when two linked clusters merge, the tokens used under the id that
disappears (current windows) are added to the surviving id's, off the request path
(``linkage/carry.py``); a reservation in flight under the old id settles there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem

from guardproxy.exchange import Exchange
from guardproxy.explain.verdict import (
    RuleExplanation,
    allowed,
    denied,
    resets_in,
    skipped,
    when_mismatch,
)
from guardproxy.guards import per_keys
from guardproxy.guards.base import Outcome, Phase, RateHeaders, RuleKind, Runtime, alone
from guardproxy.guards.per import compile_per, template
from guardproxy.guards.rates import parse_rates
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader
from guardproxy.response.events import Ending
from guardproxy.response.usage import Lease, Usage
from guardproxy.state.admission import Ask, Batch, BudgetAsk, Result, render
from guardproxy.state.budgets import Window
from guardproxy.state.retry import PendingSettle
from guardproxy.tokens import estimate_prompt, estimate_text

log = logging.getLogger("guardproxy.budget")
SETTLED = "settled"   # exchange.notes: rule -> (reserved, charged) tokens
_READS = frozenset({"GET", "HEAD", "OPTIONS"})  # without a body: nothing to charge
_COUNTS = {"total": (1.0, 1.0), "prompt": (1.0, 0.0), "completion": (0.0, 1.0)}
_RESOURCE = {(1.0, 0.0): "input-tokens", (0.0, 1.0): "output-tokens"}


@dataclass(frozen=True)
class BudgetSettings:
    windows: tuple[Window, ...]
    prompt_weight: float
    completion_weight: float
    on_exhausted: str
    min_tokens: int
    default_max_tokens: int
    lease_ttl: float | None

    def cost(self, prompt: int, completion: int) -> int:
        return math.ceil(self.prompt_weight * prompt + self.completion_weight * completion)


def _count(value: Any) -> tuple[float, float]:
    if isinstance(value, str) and value in _COUNTS:
        return _COUNTS[value]
    if isinstance(value, dict) and value and set(value) <= {"prompt", "completion"} and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for v in value.values()):
        return float(value.get("prompt", 0)), float(value.get("completion", 0))
    raise ValueError("must be prompt, completion, total, or weights like "
                     "{prompt: 1, completion: 4}")


def parse(reader: Reader) -> BudgetSettings:
    rates: tuple[RateLimitItem, ...] = reader.parsed("budget", parse_rates, ())
    prompt_w, completion_w = reader.parsed("count", _count, (1.0, 1.0))
    ttl = reader.duration("lease_ttl", 0.0)
    return BudgetSettings(
        windows=tuple(Window(int(r.amount), int(r.get_expiry())) for r in rates),
        prompt_weight=prompt_w, completion_weight=completion_w,
        on_exhausted=reader.choice("on_exhausted", ("reject", "clamp"), "reject"),
        min_tokens=reader.positive_int("min_tokens", 16),
        default_max_tokens=reader.positive_int("default_max_tokens", 1024),
        lease_ttl=ttl or None,
    )


class BudgetLease:
    def __init__(self, guard: BudgetGuard, exchange: Exchange, subject: str, lease_id: str,
                 amount: int) -> None:
        self.guard = guard
        self.exchange = exchange
        self.subject = subject
        self.lease_id = lease_id
        self.amount = amount
        self.ttl = guard.ttl

    async def renew(self) -> None:
        await self.guard.store.renew(self.subject, self.lease_id, self.guard.ttl)

    def charge(self, usage: Usage, ending: Ending, status: int) -> int:
        """The tokens to settle this lease with, given how the response ended."""
        cost = self.guard.settings.cost
        if ending in (Ending.DENIED, Ending.CANCELLED, Ending.UPSTREAM_FAILED):
            return 0
        if ending is Ending.DISCONNECTED:
            return max(self.amount, cost(usage.prompt, usage.completion))
        if status >= 400 and not usage.reported:
            return 0  # an error answer generated nothing
        return cost(usage.prompt, usage.completion)

    async def close(self, usage: Usage, ending: Ending, status: int) -> None:
        await self.close_all([self], usage, ending, status)

    async def close_all(self, leases: Sequence[Lease], usage: Usage, ending: Ending,
                        status: int) -> None:
        """Settle ``leases`` (budget leases, this one among them: one request's) in one
        store call (``SettleRetry.settle_many``), then tell each rule's observer."""
        own = [lease for lease in leases if isinstance(lease, BudgetLease)]
        charges = [lease.charge(usage, ending, status) for lease in own]
        await self.guard.settles.settle_many(
            [PendingSettle(lease.guard.store, lease.subject, lease.lease_id, actual)
             for lease, actual in zip(own, charges, strict=True)])
        for lease, actual in zip(own, charges, strict=True):
            guard = lease.guard
            try:
                # for the request's record (audit, metrics): what each rule held and charged
                lease.exchange.notes.setdefault(SETTLED, {})[guard.rule.name] = (
                    lease.amount, actual)
                guard.observer.settled(lease.exchange, guard.rule.name, lease.amount, actual,
                                       ending)
            except Exception:  # one rule's observer must not keep the others uninformed
                log.exception("recording the settle of budget rule %s failed",
                              guard.rule.name)


class BudgetGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        self.settings: BudgetSettings = rule.settings
        self.store = runtime.state.budgets
        self.admission = runtime.state.admission
        self.settles = runtime.state.settles
        self.observer = runtime.observer
        self.count = runtime.policy.tokenizer or estimate_text
        self.key = compile_per(rule.per, per_keys())
        self.when = None if rule.when.always else rule.when
        self.ttl = self.settings.lease_ttl or runtime.policy.upstream.timeout + 60.0
        weights = (self.settings.prompt_weight, self.settings.completion_weight)
        self.resource = _RESOURCE.get(weights, "tokens")
        self.dialect = runtime.dialect

    def subject(self, key: str) -> str:
        return f"{self.rule.name}|{key}"

    def plan(self, exchange: Exchange) -> Ask | Outcome | None:
        if (exchange.method in _READS and exchange.body is None) or (
                self.when is not None and not self.when(exchange.attrs(), exchange.headers)):
            return None
        body = exchange.json
        s = self.settings
        plan = exchange.plan
        if plan.deferred:  # batches, background responses: nothing to settle from
            return Outcome(allowed=False, rule=self.rule.name, shadow=self.rule.shadow,
                           status=400, kind="invalid_request", code="unsupported_under_budget",
                           message="Batch and background requests generate out of the "
                                   "proxy's sight and cannot be budgeted; send each "
                                   f"request on its own (rule '{self.rule.name}').")
        prompt = exchange.notes.get("prompt_estimate")
        if prompt is None:  # a body the proxy did not read (an upload) settles from usage
            prompt = exchange.notes["prompt_estimate"] = (
                estimate_prompt(body, self.count) if body is not None else 0)
        cap = 0
        if plan.generates:
            if plan.inject_usage and body is not None \
                    and not exchange.notes.get("hide_usage_chunk"):
                self.dialect.inject_stream_usage(body)
                exchange.body_changed = exchange.notes["hide_usage_chunk"] = True
            cap = plan.cap if plan.cap is not None else s.default_max_tokens
            if exchange.notes.get("cap") is not None:
                cap = exchange.notes["cap"]  # an earlier budget rule set (or clamped) it
            if not self.rule.shadow:
                # written before reserving: bounded even if the store fails open
                exchange.set_cap(cap)
        return BudgetAsk(
            rule=self.rule.name, shadow=self.rule.shadow,
            subject=template(self.subject(self.key(exchange))),
            lease_id=self.store.new_lease_id(), generates=plan.generates,
            prompt_weight=s.prompt_weight, prompt=prompt, completion_weight=s.completion_weight,
            copies=plan.completions, cap=cap, clamp=s.on_exhausted == "clamp",
            min_tokens=s.min_tokens, windows=s.windows, ttl=self.ttl)

    async def check(self, exchange: Exchange) -> Outcome | None:
        return await alone(self, self.admission, exchange)

    def decide(self, exchange: Exchange, ask: Ask, result: Result,
               batch: Batch) -> Outcome | None:
        if result.status < 0 or not isinstance(ask, BudgetAsk):
            return None
        cap, plan = result.cap, exchange.plan
        earlier = exchange.notes.get("cap")
        if result.allowed and earlier is not None and earlier < cap:
            # an earlier rule clamped the cap lower (on Redis Cluster in another slot, so
            # this rule reserved for the larger one): the lower cap is the one forwarded
            cap = earlier
        if result.allowed and plan.generates and not self.rule.shadow:
            # the upstream must not generate more than was reserved, whatever field it reads
            exchange.notes["cap"] = cap
            exchange.set_cap(cap)
        if result.allowed:
            exchange.notes["reserved_output"] = max(exchange.notes.get("reserved_output", 0),
                                                    cap * plan.completions)
        subject = render(ask.subject, batch.cluster.id if batch.cluster else "")
        return self._outcome(result, batch.now, subject, exchange)

    def _outcome(self, result: Result, now: float, subject: str,
                 exchange: Exchange) -> Outcome:
        i = min(range(len(result.remaining)), key=result.remaining.__getitem__)
        window = self.settings.windows[i]
        # resets are on the store's clock: shift them onto ours for the headers
        skew = time.time() - now
        rate = RateHeaders(self.resource, window.limit, result.remaining[i],
                           result.resets[i] + skew)
        if result.allowed:
            if result.lease_id is None:   # a later rule denied: the batch released it
                return Outcome(allowed=True, rule=self.rule.name, shadow=self.rule.shadow,
                               rate=(rate,))
            lease = BudgetLease(self, exchange, subject, result.lease_id, result.amount)
            return Outcome(allowed=True, rule=self.rule.name, shadow=self.rule.shadow,
                           rate=(rate,), lease=lease)
        short = [j for j, left in enumerate(result.remaining) if left < result.amount]
        reset = max(result.resets[j] for j in short)
        decided = self.settings.windows[short[0]]
        return Outcome(
            allowed=False, rule=self.rule.name, shadow=self.rule.shadow, rate=(rate,),
            retry_after=max(0.0, reset - now), kind="tokens", code="insufficient_quota",
            window=f"{decided.limit}/{decided.seconds}s",
            message=f"Token budget exhausted (rule '{self.rule.name}'): this request needs "
                    f"up to {result.amount} tokens, {max(0, min(result.remaining))} are left.",
        )

    async def explain(self, exchange: Exchange) -> RuleExplanation:
        """What ``check`` would decide, from ``store.usage`` (nothing is reserved), making
        ``check``'s body changes (output cap, stream usage) on ``exchange``. Raises
        ``StoreError`` when the store fails."""
        rule, s, plan, notes = self.rule, self.settings, exchange.plan, exchange.notes
        miss = when_mismatch(self.when, exchange)
        if exchange.method in _READS and exchange.body is None:
            miss = f"a {exchange.method} without a body: nothing to charge"
        if miss is not None:
            return skipped(rule, miss)
        if plan.deferred:
            return denied(rule, "a batch or background request cannot be budgeted", 400)
        if notes.get("prompt_estimate") is None:
            notes["prompt_estimate"] = (estimate_prompt(exchange.json, self.count)
                                        if exchange.json is not None else 0)
        prompt, cap = notes["prompt_estimate"], 0
        if plan.generates:
            if plan.inject_usage and exchange.json is not None \
                    and not notes.get("hide_usage_chunk"):
                self.dialect.inject_stream_usage(exchange.json)
                exchange.body_changed = notes["hide_usage_chunk"] = True
            cap = notes["cap"] if notes.get("cap") is not None else (
                plan.cap if plan.cap is not None else s.default_max_tokens)
        key, asked, copies = self.key(exchange), cap, plan.completions
        windows = await self.store.usage(self.subject(key), s.windows)
        left, need = min(w.remaining for w in windows), s.cost(prompt, cap * copies)
        if left < need and s.on_exhausted == "clamp" and plan.generates \
                and not rule.shadow and s.completion_weight > 0:
            room = int((left - s.prompt_weight * prompt) / (s.completion_weight * copies))
            if s.min_tokens <= room < cap and s.cost(prompt, room * copies) <= left:
                cap, need = room, s.cost(prompt, room * copies)
        ok = left >= need
        if plan.generates and not rule.shadow:
            exchange.set_cap(cap if ok else asked)
            if ok:
                notes["cap"] = cap
        detail: dict[str, Any] = {"key": key, "needs": need, "cap": cap, "windows": [
            {"limit": w.limit, "seconds": win.seconds, "used": w.used, "reserved": w.reserved,
             "remaining": w.remaining, "reset_at": w.reset_at}
            for win, w in zip(s.windows, windows, strict=True)]}
        asks = f"{key}: needs up to {need} tokens (prompt ~{prompt}, output cap {cap} x {copies})"
        if not ok:
            short = next(i for i, w in enumerate(windows) if w.remaining < need)
            win, state = s.windows[short], windows[short]
            return denied(rule, f"{asks}; {max(0, state.remaining)} left in {win.limit}/"
                          f"{win.seconds}s ({resets_in(state.reset_at, state.now)})", 429,
                          f"{win.limit}/{win.seconds}s", **detail)
        if cap < asked:
            detail["clamped_from"] = asked
            asks += f"; on_exhausted: clamp lowered the cap from {asked}"
        return allowed(rule, f"{asks}; {left} left: would reserve it, settle with the usage",
                       **detail)


def build(rule: Rule, runtime: Runtime) -> BudgetGuard:
    return BudgetGuard(rule, runtime)


KIND = RuleKind(key="budget", phase=Phase.BUDGET, parse=parse, build=build,
                fields=frozenset({"count", "on_exhausted", "min_tokens", "default_max_tokens",
                                  "lease_ttl"}))
