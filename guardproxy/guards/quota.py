"""``quota:`` — request-rate limits, counted by the ``limits`` library.

    - name: free-requests
      when: {tier: free}
      quota: 20/minute; 500/day
      per: account
      strategy: sliding-window     # fixed-window | moving-window | sliding-window

Every window of the rule is hit; the first one that is full denies the request. The
rate-limit headers describe the rule's shortest window, as OpenAI's and Anthropic's
requests-per-minute headers do: reading a window's statistics is a second store call
(a Redis round trip), so the longer windows are read only when they deny.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError as LimitsStorageError

from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards import per_keys
from guardproxy.guards.base import Outcome, Phase, RateHeaders, RuleKind, Runtime
from guardproxy.guards.per import compile_per
from guardproxy.guards.rates import parse_rates
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader

log = logging.getLogger("guardproxy.quota")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window": SlidingWindowCounterRateLimiter,
}


@dataclass(frozen=True)
class QuotaSettings:
    rates: tuple[RateLimitItem, ...]
    strategy: str


def parse(reader: Reader) -> QuotaSettings:
    rates: tuple[RateLimitItem, ...] = reader.parsed("quota", parse_rates, ())
    strategy = reader.choice("strategy", STRATEGIES, "sliding-window")
    return QuotaSettings(rates=rates, strategy=strategy)


class QuotaGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        settings: QuotaSettings = rule.settings
        self.rates = settings.rates
        self.reported = min(self.rates, key=lambda item: item.get_expiry())
        self.limiter = STRATEGIES[settings.strategy](runtime.state.limits)
        self.key = compile_per(rule.per, per_keys())
        self.when = None if rule.when.always else rule.when

    async def check(self, exchange: Exchange) -> Outcome | None:
        if self.when is not None and not self.when(exchange.attrs(), exchange.headers):
            return None
        key = self.key(exchange)
        if key is None:
            return None
        try:
            return await self._hit(key)
        except LimitsStorageError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc

    async def _hit(self, key: str) -> Outcome:
        name = self.rule.name
        reported: tuple[RateHeaders, ...] = ()
        for item in self.rates:
            allowed = await self.limiter.hit(item, name, key)
            if allowed and (self.rule.shadow or item is not self.reported):
                continue  # no header to fill: skip the second store call
            stats = await self.limiter.get_window_stats(item, name, key)
            rate = RateHeaders("requests", item.amount, stats.remaining, stats.reset_time)
            if not allowed:
                log.info("quota %s exceeded for %s (%s)%s", name, key, item,
                         " [shadow]" if self.rule.shadow else "")
                return Outcome(
                    allowed=False, rule=name, shadow=self.rule.shadow, rate=(rate,),
                    retry_after=max(0.0, stats.reset_time - time.time()),
                    kind="rate_limit", code="rate_limit_exceeded",
                    message=f"Rate limit exceeded: {item.amount} requests per "
                            f"{item.get_expiry()}s (rule '{name}'). Retry later.",
                )
            reported = (rate,)
        return Outcome(allowed=True, rule=name, shadow=self.rule.shadow, rate=reported)


def build(rule: Rule, runtime: Runtime) -> QuotaGuard:
    return QuotaGuard(rule, runtime)


KIND = RuleKind(key="quota", phase=Phase.QUOTA, parse=parse, build=build,
                fields=frozenset({"strategy"}))
