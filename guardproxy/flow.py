"""The one place that knows the order of a request's journey:

    request → path normalised, body read once into a request plan (middleware)
            → identity → enrichment (linkage: the evidence to record)
            → guards by phase (quota, budget, linkage, …): their store work and the
              linkage record in ONE admission batch → each guard decides from it
            → upstream → response stages (usage, canary, …) sharing one parse → client

Guards run in ``Phase`` order, and in file order within a phase. The first enforced
denial wins and stops evaluation, and what earlier guards hold is given back. Guards
that count in the shared store (``BatchedGuard``) do not call it: their asks go to the
store together (``state/admission.py``: one script call on Redis), judged in the same
order, so a request denied anywhere consumes nothing and costs one round trip.
Shadow denials are reported to the observers, never enforced. A ``Pipeline`` is built
once per policy around state it does not own, so a reload builds a new one aside,
reusing the state, and swaps it whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from guardproxy.dialects import Dialect, get_dialect
from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards import Guard, Outcome, RateHeaders, Runtime, rule_kinds
from guardproxy.guards.base import BatchedGuard
from guardproxy.guards.per import CLUSTER, PENDING
from guardproxy.identity import Identifier
from guardproxy.linkage.api import Cluster
from guardproxy.observe import LogObserver, Observer, Observers
from guardproxy.policy.model import Policy
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import Lease, Usage, UsageMeter, close_leases
from guardproxy.state import State
from guardproxy.state.admission import Ask, RecordAsk, Refusal
from guardproxy.trace import AUDIT_INCLUDE

log = logging.getLogger("guardproxy")


class Enricher(Protocol):
    async def enrich(self, exchange: Exchange) -> None:
        """Add what later guards key on (account linkage: the cluster) to the exchange."""


@runtime_checkable
class Recorder(Enricher, Protocol):
    """An enricher whose store work joins the admission batch (linkage)."""

    def prepare(self, exchange: Exchange) -> RecordAsk | None:
        """What to record for the request, read without awaiting."""

    def recorded(self, exchange: Exchange, cluster: Cluster | None,
                 error: StoreError | None) -> None:
        """The batch's answer: the cluster, or the error recording met."""


RECORD = "record"   # exchange.notes: (Recorder, RecordAsk) until the batch is sent


@dataclass(slots=True)
class Admission:
    """The guards' joint verdict on one request."""

    denial: Outcome | None = None
    rates: dict[str, RateHeaders] = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)
    stages: list[ResponseStage] = field(default_factory=list)
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
        # checked once here: a runtime Protocol check costs ~20 µs a call
        self.batched: dict[Guard, BatchedGuard] = {
            g: g for g in self.guards if isinstance(g, BatchedGuard)}
        self.recorders: dict[int, Recorder] = {
            id(e): e for e in self.enrichers if isinstance(e, Recorder)}

    async def enrich(self, exchange: Exchange) -> None:
        for enricher in self.enrichers:
            recorder = self.recorders.get(id(enricher))
            if recorder is not None:   # its store work joins the batch
                ask = recorder.prepare(exchange)
                if ask is not None:
                    exchange.notes[RECORD] = (recorder, ask)
                    exchange.notes[CLUSTER] = PENDING
            else:
                await enricher.enrich(exchange)

    async def admit(self, exchange: Exchange) -> Admission:
        admission = Admission()
        pending: list[tuple[Guard, Ask | Outcome]] = []
        try:
            for guard in self.guards:
                batched = self.batched.get(guard)
                if batched is None:
                    if (pending or RECORD in exchange.notes) and \
                            await self._flush(exchange, pending, admission):
                        return admission
                    outcome = await self._ask(guard, exchange, guard.check(exchange),
                                              admission)
                    if outcome is not None and \
                            await self._take(guard, exchange, outcome, admission):
                        return admission
                    continue
                try:
                    planned = batched.plan(exchange)
                except StoreError as exc:
                    self._failed(guard, exchange, exc)
                    continue
                if planned is None:
                    continue
                if isinstance(planned, Outcome) and planned.enforced_denial:
                    pending.append((guard, Refusal(guard.rule.name)))
                    await self._flush(exchange, pending, admission, planned)
                    return admission
                pending.append((guard, planned))
            if pending or RECORD in exchange.notes:
                await self._flush(exchange, pending, admission)
            return admission
        finally:
            if exchange.notes.get(CLUSTER) is PENDING:   # never sent: no cluster known
                del exchange.notes[CLUSTER]

    async def _flush(self, exchange: Exchange, pending: list[tuple[Guard, Ask | Outcome]],
                     admission: Admission, refused: Outcome | None = None) -> bool:
        """Send the batched guards' asks and the linkage record in one store call, then
        take each rule's outcome in order. True when the request is denied (``refused``:
        the enforced denial that ended the batch, a rule's without the store)."""
        record = exchange.notes.pop(RECORD, None)
        pending_items = [*pending]
        asks = [(guard, item) for guard, item in pending_items if not isinstance(item, Outcome)]
        started = time.perf_counter()
        try:
            batch = await self.state.admission.admit([a for _, a in asks],
                                                     record[1] if record else None)
        except StoreError as exc:
            if record is not None:
                record[0].recorded(exchange, None, exc)
            for guard, ask in asks:   # every rule that asked follows its on_store_error
                if isinstance(ask, Refusal):
                    continue
                self.observer.store_error(exchange, guard.rule.name, exc)
                if guard.rule.name not in self.fail_open:
                    await self.release(admission, Ending.DENIED)
                    raise
            batch = None
        finally:
            pending.clear()
        elapsed = time.perf_counter() - started
        if batch is not None and record is not None:
            record[0].recorded(exchange, batch.cluster, None)
        results = iter(batch.results) if batch is not None else None
        for guard, item in pending_items:
            if isinstance(item, Refusal):
                outcome: Outcome | None = refused
            elif isinstance(item, Outcome):
                outcome = item
            else:
                name = guard.rule.name
                admission.seconds[name] = admission.seconds.get(name, 0.0) + elapsed
                if results is None or batch is None:   # store failed, the rule fails open
                    continue
                outcome = self.batched[guard].decide(exchange, item, next(results), batch)
            if outcome is not None and await self._take(guard, exchange, outcome, admission):
                return True
        return False

    async def _take(self, guard: Guard, exchange: Exchange, outcome: Outcome,
                    admission: Admission) -> bool:
        """Add a rule's outcome to the admission; True (and what is held given back)
        when it is the request's enforced denial."""
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
        if self._denied(exchange, outcome):
            admission.denial = outcome
            await self.release(admission, Ending.DENIED)
            return True
        return False

    def _failed(self, guard: Guard, exchange: Exchange, exc: StoreError) -> None:
        """A rule that could not plan (its cluster is unknown): it passes with
        ``on_store_error: allow``, else the error denies (503)."""
        self.observer.store_error(exchange, guard.rule.name, exc)
        if guard.rule.name not in self.fail_open:
            raise exc

    async def _ask(self, guard: Guard, exchange: Exchange, call: Awaitable[Outcome | None],
                   admission: Admission) -> Outcome | None:
        """One unbatched guard call; a store error denies (503) or, with
        on_store_error: allow, lets the rule pass."""
        started = time.perf_counter()
        try:
            return await call
        except StoreError as exc:
            self.observer.store_error(exchange, guard.rule.name, exc)
            if guard.rule.name not in self.fail_open:
                await self.release(admission, Ending.DENIED)
                raise
            return None
        finally:
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
