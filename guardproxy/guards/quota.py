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

``per: cluster``: when two linked clusters merge, ``carry`` adds the hits counted under
the id that disappeared to the surviving id (``linkage/carry.py``, off the request
path), once per merge and window (a marker counter: a repeated report adds nothing,
and neither does a re-merge after a split within the same window).
fixed-window: the absorbed id's count is added to the survivor's window (a survivor
without an open window opens one at the merge, holding the carried hits).
sliding-window: what the limiter sees for the absorbed id now (its previous window
weighted, plus its current one) is added to the survivor's *current* window, so the
carried part decays one window later than it would have: stricter, never looser.
moving-window: not carried. The ``limits`` storage can only add entries stamped now,
which would hold the absorbed cluster's requests for a whole window after the merge;
the merged cluster's moving window counts its own id's entries only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from limits import RateLimitItem
from limits.aio.storage import SlidingWindowCounterSupport
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError as LimitsStorageError

from guardproxy.errors import StoreError
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
from guardproxy.guards.base import Outcome, Phase, RateHeaders, RuleKind, Runtime
from guardproxy.guards.per import compile_per
from guardproxy.guards.rates import parse_rates, rate_text
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader

log = logging.getLogger("guardproxy.quota")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window": SlidingWindowCounterRateLimiter,
}
UNBOUNDED = 2 ** 53   # a limit no carried count reaches: the carry itself is never refused


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

    async def carry(self, moves: Sequence[tuple[str, str]]) -> int:
        """For each ``(source key, target key)`` in order, add the hits counted under
        the source to the target, in every window of the rule (see the module
        docstring for what each strategy does). Returns the hits added, over windows.
        Raises ``StoreError`` when the store fails; a carry marked but not added then
        is lost (never added twice)."""
        limiter = self.limiter
        sliding = isinstance(limiter, SlidingWindowCounterRateLimiter)
        if not sliding and not isinstance(limiter, FixedWindowRateLimiter):
            return 0
        storage = limiter.storage
        name, added = self.rule.name, 0
        try:
            for source, target in moves:
                if source == target:
                    continue
                for item in self.rates:
                    expiry, key = item.get_expiry(), item.key_for(name, source)
                    if sliding:
                        prev, prev_ttl, current, _ = await cast(
                            SlidingWindowCounterSupport, storage).get_sliding_window(key, expiry)
                        count = math.floor(prev * prev_ttl / expiry + current)
                    else:
                        count = await storage.get(key)
                    if count <= 0:
                        continue
                    # the marker first: two replicas reporting one merge add it once
                    if await storage.incr(item.key_for(name, source, "carried-to", target),
                                          expiry) != 1:
                        continue
                    if sliding:
                        await cast(SlidingWindowCounterSupport, storage) \
                            .acquire_sliding_window_entry(item.key_for(name, target),
                                                          UNBOUNDED, expiry, count)
                    else:
                        await storage.incr(item.key_for(name, target), expiry, amount=count)
                    added += count
        except LimitsStorageError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc
        return added

    def _denial(self, item: RateLimitItem, rate: RateHeaders, key: str) -> Outcome:
        name = self.rule.name
        log.debug("quota %s exceeded for %s (%s)%s", name, key, item,
                  " [shadow]" if self.rule.shadow else "")
        return Outcome(
            allowed=False, rule=name, shadow=self.rule.shadow, rate=(rate,),
            retry_after=max(0.0, rate.reset_at - time.time()),
            kind="rate_limit", code="rate_limit_exceeded", window=rate_text(item),
            message=f"Rate limit exceeded: {item.amount} requests per "
                    f"{item.get_expiry()}s (rule '{name}'). Retry later.",
        )

    async def explain(self, exchange: Exchange) -> RuleExplanation:
        """What ``check`` would decide, from the windows as they are (nothing is hit).
        Raises ``StoreError`` when the store fails."""
        miss = when_mismatch(self.when, exchange)
        if miss is not None:
            return skipped(self.rule, miss)
        key, windows, full = self.key(exchange), [], None
        try:
            for item in self.rates:
                stats = await self.limiter.get_window_stats(item, self.rule.name, key)
                windows.append({"rate": rate_text(item), "limit": item.amount,
                                "seconds": item.get_expiry(), "remaining": stats.remaining,
                                "reset_at": stats.reset_time})
                if stats.remaining < 1 and full is None:
                    full = (f"{rate_text(item)} is used up for {key} "
                            f"({resets_in(stats.reset_time)})", item)
        except LimitsStorageError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc
        if full is not None:
            return denied(self.rule, full[0], 429, rate_text(full[1]), key=key, windows=windows)
        left = "; ".join(f"{w['remaining']} of {w['rate']} left" for w in windows)
        return allowed(self.rule, f"{key}: {left}; this request would count 1 in each",
                       key=key, windows=windows)


def build(rule: Rule, runtime: Runtime) -> QuotaGuard:
    return QuotaGuard(rule, runtime)


KIND = RuleKind(key="quota", phase=Phase.QUOTA, parse=parse, build=build,
                fields=frozenset({"strategy"}))
