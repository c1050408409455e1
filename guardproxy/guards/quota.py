"""``quota:`` — request-rate limits, counted by the ``limits`` library.

    - name: free-requests
      when: {tier: free}
      quota: 20/minute; 500/day
      per: account
      strategy: sliding-window     # fixed-window | moving-window | sliding-window

A request is counted only if every window of the rule has room, and only if no rule
of the policy denies it: the quota asks of all rules go to the store in one batch with
the budgets and the linkage record (``state/admission.py``; one script call on Redis),
judged in order, so a request denied anywhere consumes nothing. The strategies are the
``limits`` library's, reimplemented to run inside that batch (``state/windows.py``,
``state/lua/quota_windows.lua``) and tested against ``limits`` itself. The rate-limit
headers describe the rule's shortest window, as OpenAI's and Anthropic's
requests-per-minute headers do.

``per: cluster``: when two linked clusters merge, ``carry`` adds the hits counted under
the id that disappeared to the surviving id (``linkage/carry.py``, off the request
path), once per merge and window (a marker: a repeated report adds nothing, and neither
does a re-merge after a split within the same window).
fixed-window: the absorbed id's count is added to the survivor's window (a survivor
without an open window opens one at the merge, holding the carried hits).
sliding-window: what the limiter sees for the absorbed id now (its previous window
weighted, plus its current one) is added to the survivor's *current* window, so the
carried part decays one window later than it would have: stricter, never looser.
moving-window: not carried (the survivor's window would hold the absorbed requests,
stamped now, for a whole window after the merge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

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
from guardproxy.guards.rates import parse_rates, rate_text
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader
from guardproxy.state.admission import Ask, Batch, QuotaAsk, Result
from guardproxy.state.windows import STRATEGY_CODES

log = logging.getLogger("guardproxy.quota")


@dataclass(frozen=True)
class QuotaSettings:
    rates: tuple[RateLimitItem, ...]
    strategy: str


def parse(reader: Reader) -> QuotaSettings:
    rates: tuple[RateLimitItem, ...] = reader.parsed("quota", parse_rates, ())
    strategy = reader.choice("strategy", STRATEGY_CODES, "sliding-window")
    return QuotaSettings(rates=rates, strategy=strategy)


class QuotaGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        settings: QuotaSettings = rule.settings
        self.rates = settings.rates
        self.strategy = STRATEGY_CODES[settings.strategy]
        # per rule, once: what every request's ask carries
        self.windows = tuple((int(r.amount), int(r.get_expiry())) for r in self.rates)
        self.texts = tuple(rate_text(r) for r in self.rates)
        self.reported = min(range(len(self.rates)), key=lambda i: self.windows[i][1])
        self.store = runtime.state.admission
        self.key = compile_per(rule.per, per_keys())
        self.when = None if rule.when.always else rule.when

    def ask(self, key: str) -> QuotaAsk:
        return QuotaAsk(self.rule.name, self.rule.shadow, self.strategy, template(key),
                        self.windows)

    def plan(self, exchange: Exchange) -> Ask | Outcome | None:
        if self.when is not None and not self.when(exchange.attrs(), exchange.headers):
            return None
        return self.ask(self.key(exchange))

    async def check(self, exchange: Exchange) -> Outcome | None:
        return await alone(self, self.store, exchange)

    def decide(self, exchange: Exchange, ask: Ask, result: Result,
               batch: Batch) -> Outcome | None:
        if not result.status >= 0:
            return None
        skew = time.time() - batch.now   # resets are on the store's clock
        if not result.allowed:
            i = result.denied
            return self._denial(i, RateHeaders("requests", self.windows[i][0],
                                               result.remaining[i], result.resets[i] + skew))
        i = self.reported   # what is left once this request counted (as found if not)
        rate = RateHeaders("requests", self.windows[i][0], result.remaining[i],
                           result.resets[i] + skew)
        return Outcome(allowed=True, rule=self.rule.name, shadow=self.rule.shadow,
                       rate=(rate,))

    async def carry(self, moves: Sequence[tuple[str, str]]) -> int:
        """For each ``(source key, target key)`` in order, add the hits counted under
        the source to the target, in every window of the rule (see the module
        docstring for what each strategy does). Returns the hits added, over windows.
        Raises ``StoreError`` when the store fails; a carry marked but not added then
        is lost (never added twice)."""
        return await self.store.carry_quota(self.ask(""), moves)

    def _denial(self, i: int, rate: RateHeaders) -> Outcome:
        name = self.rule.name
        log.debug("quota %s exceeded (%s)%s", name, self.texts[i],
                  " [shadow]" if self.rule.shadow else "")
        return Outcome(
            allowed=False, rule=name, shadow=self.rule.shadow, rate=(rate,),
            retry_after=max(0.0, rate.reset_at - time.time()),
            kind="rate_limit", code="rate_limit_exceeded", window=self.texts[i],
            message=f"Rate limit exceeded: {self.windows[i][0]} requests per "
                    f"{self.windows[i][1]}s (rule '{name}'). Retry later.",
        )

    async def explain(self, exchange: Exchange) -> RuleExplanation:
        """What ``check`` would decide, from the windows as they are (nothing is hit).
        Raises ``StoreError`` when the store fails."""
        miss = when_mismatch(self.when, exchange)
        if miss is not None:
            return skipped(self.rule, miss)
        key = self.key(exchange)
        state = await self.store.quota_state(self.ask(key))
        windows = [{"rate": self.texts[i], "limit": limit, "seconds": seconds,
                    "remaining": state.remaining[i], "reset_at": state.resets[i]}
                   for i, (limit, seconds) in enumerate(self.windows)]
        if state.denied >= 0:
            i = state.denied
            return denied(self.rule, f"{self.texts[i]} is used up for {key} "
                          f"({resets_in(state.resets[i])})", 429, self.texts[i], key=key,
                          windows=windows)
        left = "; ".join(f"{w['remaining']} of {w['rate']} left" for w in windows)
        return allowed(self.rule, f"{key}: {left}; this request would count 1 in each",
                       key=key, windows=windows)


def build(rule: Rule, runtime: Runtime) -> QuotaGuard:
    return QuotaGuard(rule, runtime)


KIND = RuleKind(key="quota", phase=Phase.QUOTA, parse=parse, build=build,
                fields=frozenset({"strategy"}))
