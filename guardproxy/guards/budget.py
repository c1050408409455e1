"""``budget:`` — token budgets, reserved before the call and settled after it.

    - name: daily-tokens
      budget: 2000000/day; 50000000/month
      count: total              # prompt | completion | total | {prompt: 1, completion: 4}
      per: account
      on_exhausted: reject      # reject | clamp (shrink max_tokens to what is left)
      min_tokens: 16            # clamp never goes below this; less left -> reject
      default_max_tokens: 1024  # written into requests that name no limit

Before forwarding, the estimated prompt plus the request's output cap is reserved in
every window at once (one atomic store call). After the response, the reservation is
settled with the reported usage. A client that disconnects mid-stream is charged the
whole reservation: the upstream may have generated all of it, and guardproxy stops
reading, so the reservation is the honest upper bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem

from guardproxy.exchange import Exchange
from guardproxy.guards import per_keys
from guardproxy.guards.base import Outcome, Phase, RateHeaders, RuleKind, Runtime
from guardproxy.guards.per import compile_per
from guardproxy.guards.rates import parse_rates
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader
from guardproxy.response.events import Ending
from guardproxy.response.usage import Usage
from guardproxy.state.budgets import BudgetStore, Reservation, Window
from guardproxy.tokens import estimate_prompt, estimate_text

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
    from guardproxy.policy.load import parse_duration

    rates: tuple[RateLimitItem, ...] = reader.parsed("budget", parse_rates, ())
    prompt_w, completion_w = reader.parsed("count", _count, (1.0, 1.0))
    ttl = reader.parsed("lease_ttl", parse_duration, 0.0)
    return BudgetSettings(
        windows=tuple(Window(int(r.amount), int(r.get_expiry())) for r in rates),
        prompt_weight=prompt_w, completion_weight=completion_w,
        on_exhausted=reader.choice("on_exhausted", ("reject", "clamp"), "reject"),
        min_tokens=reader.typed("min_tokens", int, 16) or 16,
        default_max_tokens=reader.typed("default_max_tokens", int, 1024) or 1024,
        lease_ttl=ttl or None,
    )


class BudgetLease:
    def __init__(self, store: BudgetStore, subject: str, lease_id: str, amount: int,
                 settings: BudgetSettings) -> None:
        self.store = store
        self.subject = subject
        self.lease_id = lease_id
        self.amount = amount
        self.settings = settings

    async def close(self, usage: Usage, ending: Ending, status: int) -> None:
        if ending in (Ending.DENIED, Ending.UPSTREAM_FAILED):
            actual = 0
        elif ending is Ending.DISCONNECTED:
            actual = max(self.amount, self.settings.cost(usage.prompt, usage.completion))
        elif status >= 400 and not usage.reported:
            actual = 0  # an error answer generated nothing
        else:
            actual = self.settings.cost(usage.prompt, usage.completion)
        await self.store.settle(self.subject, self.lease_id, actual)


class BudgetGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        self.settings: BudgetSettings = rule.settings
        self.store = runtime.state.budgets
        self.dialect = runtime.dialect
        self.count = runtime.policy.tokenizer or estimate_text
        self.key = compile_per(rule.per, per_keys())
        self.when = None if rule.when.always else rule.when
        self.ttl = self.settings.lease_ttl or runtime.policy.upstream.timeout + 60.0
        weights = (self.settings.prompt_weight, self.settings.completion_weight)
        self.resource = _RESOURCE.get(weights, "tokens")

    def subject(self, key: str) -> str:
        return f"{self.rule.name}|{key}"

    async def check(self, exchange: Exchange) -> Outcome | None:
        body = exchange.json
        if body is None or (self.when is not None
                            and not self.when(exchange.attrs(), exchange.headers)):
            return None
        key = self.key(exchange)
        if key is None:
            return None
        s = self.settings
        prompt = exchange.notes.get("prompt_estimate")
        if prompt is None:
            prompt = exchange.notes["prompt_estimate"] = estimate_prompt(body, self.count)
            exchange.notes["hide_usage_chunk"] = self.dialect.ensure_stream_usage(exchange)
        field = self.dialect.completion_field(exchange.path, body)
        cap = body.get(field) if field else 0
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            cap = s.default_max_tokens
            if field and not self.rule.shadow:
                exchange.set_json(field, cap)
        copies = self.dialect.completions_per_request(exchange.path, body)  # n, best_of
        subject = self.subject(key)
        result = await self.store.reserve(subject, s.windows, s.cost(prompt, cap * copies),
                                          self.ttl)
        if not result.ok and s.on_exhausted == "clamp" and field and not self.rule.shadow \
                and s.completion_weight > 0:
            room = int((min(result.remaining) - s.prompt_weight * prompt)
                       / (s.completion_weight * copies))
            if s.min_tokens <= room < cap:
                result = await self.store.reserve(subject, s.windows,
                                                  s.cost(prompt, room * copies), self.ttl)
                if result.ok:
                    exchange.set_json(field, room)
        return self._outcome(result, subject)

    def _outcome(self, result: Reservation, subject: str) -> Outcome:
        i = min(range(len(result.remaining)), key=result.remaining.__getitem__)
        window = self.settings.windows[i]
        rate = RateHeaders(self.resource, window.limit, result.remaining[i], result.resets[i])
        if result.ok:
            assert result.lease_id is not None
            lease = BudgetLease(self.store, subject, result.lease_id, result.amount,
                                self.settings)
            return Outcome(allowed=True, rule=self.rule.name, shadow=self.rule.shadow,
                           rate=(rate,), lease=lease)
        short = [j for j, left in enumerate(result.remaining) if left < result.amount]
        reset = max(result.resets[j] for j in short)
        return Outcome(
            allowed=False, rule=self.rule.name, shadow=self.rule.shadow, rate=(rate,),
            retry_after=max(0.0, reset - time.time()), kind="tokens", code="insufficient_quota",
            message=f"Token budget exhausted (rule '{self.rule.name}'): this request needs "
                    f"up to {result.amount} tokens, {max(0, min(result.remaining))} are left.",
        )


def build(rule: Rule, runtime: Runtime) -> BudgetGuard:
    return BudgetGuard(rule, runtime)


KIND = RuleKind(key="budget", phase=Phase.BUDGET, parse=parse, build=build,
                fields=frozenset({"count", "on_exhausted", "min_tokens", "default_max_tokens",
                                  "lease_ttl"}))
