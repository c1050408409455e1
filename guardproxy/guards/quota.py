"""``quota:`` — request-rate limits, counted by the ``limits`` library.

    - name: free-requests
      when: {tier: free}
      quota: 20/minute; 500/day
      per: account
      strategy: sliding-window     # fixed-window | moving-window | sliding-window

A request is admitted in two steps, so that a request denied by one window or one
rule consumes nothing anywhere: ``check`` reads every window (the first that is full
denies), and only once every guard of the policy has allowed the request does
``commit`` hit them. A window that filled up between the two (a concurrent request)
denies then. The rate-limit headers describe the rule's shortest window, as OpenAI's
and Anthropic's requests-per-minute headers do.
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
        try:
            return await self._test(key)
        except LimitsStorageError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc

    async def _test(self, key: str) -> Outcome:
        name = self.rule.name
        reported: tuple[RateHeaders, ...] = ()
        for item in self.rates:
            stats = await self.limiter.get_window_stats(item, name, key)
            rate = RateHeaders("requests", item.amount, stats.remaining, stats.reset_time)
            if stats.remaining < 1:
                return self._denial(item, rate, key)
            if item is self.reported:
                # the headers show what is left once this request is counted
                reported = (RateHeaders("requests", item.amount, stats.remaining - 1,
                                        stats.reset_time),)

        async def commit() -> Outcome | None:
            try:
                for item in self.rates:
                    if not await self.limiter.hit(item, name, key):
                        stats = await self.limiter.get_window_stats(item, name, key)
                        return self._denial(item, RateHeaders(
                            "requests", item.amount, stats.remaining, stats.reset_time), key)
            except LimitsStorageError as exc:
                raise StoreError(f"quota store unavailable: {exc}") from exc
            return None

        return Outcome(allowed=True, rule=name, shadow=self.rule.shadow, rate=reported,
                       commit=commit)

    def _denial(self, item: RateLimitItem, rate: RateHeaders, key: str) -> Outcome:
        name = self.rule.name
        log.debug("quota %s exceeded for %s (%s)%s", name, key, item,
                  " [shadow]" if self.rule.shadow else "")
        return Outcome(
            allowed=False, rule=name, shadow=self.rule.shadow, rate=(rate,),
            retry_after=max(0.0, rate.reset_at - time.time()),
            kind="rate_limit", code="rate_limit_exceeded", window=str(item),
            message=f"Rate limit exceeded: {item.amount} requests per "
                    f"{item.get_expiry()}s (rule '{name}'). Retry later.",
        )


def build(rule: Rule, runtime: Runtime) -> QuotaGuard:
    return QuotaGuard(rule, runtime)


KIND = RuleKind(key="quota", phase=Phase.QUOTA, parse=parse, build=build,
                fields=frozenset({"strategy"}))
