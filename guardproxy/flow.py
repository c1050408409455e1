"""The one place that knows the order of a request's journey:

    request → identity → guards by phase (shaping, quota, budget, linkage, …)
            → upstream → response stages (usage, canary, …) → client

Guards run in ``Phase`` order, and in file order within a phase. The first enforced
denial wins and stops evaluation; shadow denials are logged and counted, never
enforced. Everything here is built once per policy, so a reload can build a new
``Pipeline`` aside and swap it whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from guardproxy.dialects import Dialect, get_dialect
from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards import Guard, Outcome, RateHeaders, Runtime, rule_kinds
from guardproxy.identity import Identifier
from guardproxy.policy.model import Policy
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import Lease, Usage, UsageMeter
from guardproxy.state import State, open_state

log = logging.getLogger("guardproxy")


@dataclass(slots=True)
class Admission:
    """The guards' joint verdict on one request."""

    denial: Outcome | None = None
    rates: dict[str, RateHeaders] = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)
    stages: list[ResponseStage] = field(default_factory=list)

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
    def __init__(self, policy: Policy, state: State | None = None) -> None:
        self.policy = policy
        self.dialect: Dialect = get_dialect(policy.upstream.dialect)
        self.state = state or open_state(policy.state, policy.key_prefix)
        self.identifier = Identifier(policy, self.dialect)
        runtime = Runtime(policy=policy, state=self.state, dialect=self.dialect)
        kinds = rule_kinds()
        ordered = sorted(enumerate(policy.rules), key=lambda ir: (kinds[ir[1].kind].phase, ir[0]))
        self.guards: tuple[Guard, ...] = tuple(kinds[r.kind].build(r, runtime) for _, r in ordered)
        self.fail_open = {r.name for r in policy.rules if r.on_store_error == "allow"}

    async def admit(self, exchange: Exchange) -> Admission:
        admission = Admission()
        for guard in self.guards:
            try:
                outcome = await guard.check(exchange)
            except StoreError:
                if guard.rule.name not in self.fail_open:
                    await self.release(admission, Ending.DENIED)
                    raise
                log.warning("rule %s: state store unavailable, allowing (on_store_error: allow)",
                            guard.rule.name, exc_info=True)
                continue
            if outcome is None:
                continue
            admission.add_rates(outcome)
            if outcome.lease is not None:
                admission.leases.append(outcome.lease)
            if outcome.stage is not None:
                admission.stages.append(outcome.stage)
            if outcome.enforced_denial:
                admission.denial = outcome
                await self.release(admission, Ending.DENIED)
                return admission
            if not outcome.allowed:
                log.info("shadow denial by rule %s for account %s", outcome.rule,
                         exchange.account.id if exchange.account else "-")
        return admission

    @staticmethod
    async def release(admission: Admission, ending: Ending) -> None:
        """Give back what the guards that already ran hold (a later one denied)."""
        for lease in admission.leases:
            await lease.close(Usage(0, 0, reported=False), ending, 0)
        for stage in admission.stages:
            await stage.finish(ending)
        admission.leases.clear()
        admission.stages.clear()

    def response_stages(self, exchange: Exchange,
                        admission: Admission) -> list[ResponseStage]:
        """The response path, in order: usage is read from what upstream sent, before
        any stage (canaries) rewrites the text the client gets."""
        stages: list[ResponseStage] = []
        if admission.leases:
            stages.append(UsageMeter(self.dialect, admission.leases,
                                     exchange.notes.get("prompt_estimate", 0),
                                     bool(exchange.notes.get("hide_usage_chunk"))))
        stages.extend(admission.stages)
        return stages

    async def aclose(self) -> None:
        await self.state.aclose()
