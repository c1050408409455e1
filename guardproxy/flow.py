"""The one place that knows the order of a request's journey:

    request → path normalised, body read once into a request plan (middleware)
            → identity → enrichment (linkage will add the cluster here)
            → guards by phase (shaping, quota, budget, linkage, …) → deferred commits
            → upstream → response stages (usage, canary, …) sharing one parse → client

Guards run in ``Phase`` order, and in file order within a phase. The first enforced
denial wins and stops evaluation, and what earlier guards hold is given back; work a
guard defers (``Outcome.commit``: quota hits) runs only once every guard has allowed
the request, so a denied request consumes nothing. Shadow denials are reported to the
observers, never enforced. A ``Pipeline`` is built once per policy around state it does
not own, so a reload builds a new one aside, reusing the state, and swaps it whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from guardproxy.dialects import Dialect, get_dialect
from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards import Guard, Outcome, RateHeaders, Runtime, rule_kinds
from guardproxy.guards.per import CLUSTER
from guardproxy.identity import Identifier
from guardproxy.observe import LogObserver, Observer, Observers
from guardproxy.policy.model import Policy
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import Lease, Usage, UsageMeter, close_leases
from guardproxy.state import State
from guardproxy.trace import AUDIT_INCLUDE

log = logging.getLogger("guardproxy")


class Enricher(Protocol):
    async def enrich(self, exchange: Exchange) -> None:
        """Add what later guards key on (account linkage: the cluster) to the exchange."""


@dataclass(slots=True)
class Admission:
    """The guards' joint verdict on one request."""

    denial: Outcome | None = None
    rates: dict[str, RateHeaders] = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)
    stages: list[ResponseStage] = field(default_factory=list)
    commits: list[tuple[Guard, Callable[[], Awaitable[Outcome | None]]]] = field(
        default_factory=list)
    decisions: list[Outcome] = field(default_factory=list)   # every rule that decided
    seconds: dict[str, float] = field(default_factory=dict)   # rule -> time in its calls

    def add_rates(self, outcome: Outcome) -> None:
        # Report the tightest window per resource, as the SDKs expect one value each.
        # A shadow rule enforces nothing, so it must not show in the headers either.
        if outcome.shadow:
            return
        for rate in outcome.rate:
            held = self.rates.get(rate.resource)
            if held is None or rate.remaining < held.remaining:
                self.rates[rate.resource] = rate


class Pipeline:
    def __init__(self, policy: Policy, state: State, observer: Observer | None = None,
                 enrichers: Sequence[Enricher] = ()) -> None:
        self.policy = policy
        self.dialect: Dialect = get_dialect(policy.upstream.dialect)
        self.state = state
        self.observer: Observers = observer if isinstance(observer, Observers) else \
            Observers(observer or LogObserver())
        self.enrichers = tuple(enrichers)
        self.identifier = Identifier(policy, self.dialect)
        runtime = Runtime(policy=policy, state=state, dialect=self.dialect,
                          observer=self.observer)
        kinds = rule_kinds()
        ordered = sorted(enumerate(policy.rules), key=lambda ir: (kinds[ir[1].kind].phase, ir[0]))
        self.guards: tuple[Guard, ...] = tuple(kinds[r.kind].build(r, runtime) for _, r in ordered)
        self.fail_open = {r.name for r in policy.rules if r.on_store_error == "allow"}
        # a cluster's counters never show in rate headers: a fresh account would learn
        # from them that it is linked (and to how much use)
        self.private = frozenset(g for g in self.guards if CLUSTER in g.rule.per)

    async def enrich(self, exchange: Exchange) -> None:
        for enricher in self.enrichers:
            await enricher.enrich(exchange)

    async def admit(self, exchange: Exchange) -> Admission:
        admission = Admission()
        for guard in self.guards:
            outcome = await self._ask(guard, exchange, guard.check(exchange), admission)
            if outcome is None:
                continue
            admission.decisions.append(outcome)
            if guard.rule.audit_include:   # this rule asks for the request's text
                exchange.notes[AUDIT_INCLUDE] = frozenset(
                    exchange.notes.get(AUDIT_INCLUDE, frozenset()) | set(guard.rule.audit_include))
            if guard not in self.private:
                admission.add_rates(outcome)
            if outcome.lease is not None:
                admission.leases.append(outcome.lease)
            if outcome.stage is not None:
                admission.stages.append(outcome.stage)
            if outcome.commit is not None:
                admission.commits.append((guard, outcome.commit))
            if self._denied(exchange, outcome):
                admission.denial = outcome
                await self.release(admission, Ending.DENIED)
                return admission
        for guard, commit in admission.commits:
            outcome = await self._ask(guard, exchange, commit(), admission)
            if outcome is not None and self._denied(exchange, outcome):
                # the deferred hit found the window full: that is the rule's verdict
                admission.decisions[:] = [outcome if d.rule == outcome.rule else d
                                          for d in admission.decisions]
                admission.denial = outcome
                if guard not in self.private:
                    admission.add_rates(outcome)
                await self.release(admission, Ending.DENIED)
                return admission
        admission.commits.clear()
        return admission

    async def _ask(self, guard: Guard, exchange: Exchange, call: Awaitable[Outcome | None],
                   admission: Admission) -> Outcome | None:
        """One guard call; a store error denies (503) or, with on_store_error: allow,
        lets the rule pass."""
        started = time.perf_counter()
        try:
            return await call
        except StoreError as exc:
            self.observer.store_error(exchange, guard.rule.name, exc)
            if guard.rule.name not in self.fail_open:
                await self.release(admission, Ending.DENIED)
                raise
            return None
        finally:   # a rule's state-store latency, on Redis (check and deferred commit)
            name = guard.rule.name
            admission.seconds[name] = admission.seconds.get(name, 0.0) + \
                time.perf_counter() - started

    def _denied(self, exchange: Exchange, outcome: Outcome) -> bool:
        if outcome.allowed:
            return False
        self.observer.decision(exchange, outcome)
        return not outcome.shadow

    @staticmethod
    async def release(admission: Admission, ending: Ending) -> None:
        """Give back what the guards that already ran hold (a later one denied)."""
        # one store call for all of them (budgets settle together: issue 12)
        await close_leases(admission.leases, Usage(0, 0, reported=False), ending, 0)
        for stage in admission.stages:
            await stage.finish(ending)
        admission.leases.clear()
        admission.stages.clear()

    def response(self, exchange: Exchange, admission: Admission) -> ResponseDriver:
        """The response path, in order: usage is read from what upstream sent, before
        any stage (canaries) rewrites the text the client gets."""
        stages: list[ResponseStage] = []
        if admission.leases:
            stages.append(UsageMeter(self.dialect, admission.leases,
                                     exchange.notes.get("prompt_estimate", 0),
                                     bool(exchange.notes.get("hide_usage_chunk")),
                                     exchange.notes.get("reserved_output", 0)))
        stages.extend(admission.stages)
        return ResponseDriver(stages, self.policy.upstream.max_event_bytes)


class LeaseKeeper:
    """Renews a response's budget leases while it runs, so a stream longer than the
    lease TTL never loses its reservation. Costs a timer, not a task, until it fires."""

    def __init__(self, leases: list[Lease], every: float) -> None:
        self.leases = leases
        self.every = every
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        if leases:
            self.timer = self.loop.call_later(every, self._fire)

    def _fire(self) -> None:
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._renew())
        self.timer = self.loop.call_later(self.every, self._fire)

    async def _renew(self) -> None:
        for lease in self.leases:
            try:
                await lease.renew()
            except Exception:  # the next tick tries again; the lease TTL is the backstop
                log.warning("renewing a budget lease failed", exc_info=True)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
