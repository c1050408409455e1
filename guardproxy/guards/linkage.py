"""``linkage:`` — act on the linked cluster a request's account belongs to.

    - name: hydra-size
      linkage: {max_accounts: 5}          # a cluster of more than 5 accounts is denied
    - name: linked-to-blocked
      linkage: {linked_to: blocked}       # an account linked to a blocked one is denied

The cluster comes from the linkage enricher (``exchange.notes["cluster"]``; the
policy's top-level ``linkage:`` declares the evidence). Denials are 403 in the dialect's
error JSON and name neither the cluster nor any other account: telling a hydra which
of its accounts were caught would tell it which to retire. In shadow mode they are
counted by the observers, never enforced. When recording the cluster failed, the rule's
``on_store_error`` decides (deny: 503; allow: the rule passes). Without linkage in the
policy the rule has nothing to say.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardproxy.exchange import Exchange
from guardproxy.explain.verdict import (
    RuleExplanation,
    allowed,
    denied,
    skipped,
    when_mismatch,
)
from guardproxy.guards.base import Outcome, Phase, RuleKind, Runtime
from guardproxy.guards.per import CLUSTER, PENDING, cluster_of
from guardproxy.linkage.api import Cluster
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader
from guardproxy.state.admission import Ask, Batch, GateAsk, Result

LINKED_TO = ("blocked",)


@dataclass(frozen=True)
class LinkageRuleSettings:
    max_accounts: int | None = None   # deny clusters of more accounts than this
    linked_to: str | None = None      # "blocked": deny accounts linked to a blocked one


def parse(rule: Reader) -> LinkageRuleSettings:
    reader = rule.child("linkage")
    if reader is None:
        rule.problem("must be a mapping: {max_accounts: N} or {linked_to: blocked}",
                     "linkage")
        return LinkageRuleSettings()
    reader.allow(("max_accounts", "linked_to"))
    given = [k for k in ("max_accounts", "linked_to") if reader.has(k)]
    if len(given) != 1:
        reader.problem("give exactly one of max_accounts: N or linked_to: blocked")
    max_accounts = reader.positive_int("max_accounts", 1) if reader.has("max_accounts") \
        else None
    linked_to = reader.choice("linked_to", LINKED_TO, LINKED_TO[0]) \
        if reader.has("linked_to") else None
    return LinkageRuleSettings(max_accounts=max_accounts, linked_to=linked_to)


class LinkageGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        self.settings: LinkageRuleSettings = rule.settings
        self.when = None if rule.when.always else rule.when

    def plan(self, exchange: Exchange) -> Ask | Outcome | None:
        if self.when is not None and not self.when(exchange.attrs(), exchange.headers):
            return None
        cluster = cluster_of(exchange)   # StoreError: the rule's on_store_error decides
        if cluster is None:
            return None
        s = self.settings
        if cluster is PENDING:   # recorded in the admission batch: judged there
            return GateAsk(self.rule.name, self.rule.shadow, s.max_accounts,
                           s.linked_to == "blocked")
        return self._judge(cluster)

    async def check(self, exchange: Exchange) -> Outcome | None:
        planned = self.plan(exchange)
        if planned is None or isinstance(planned, Outcome):
            return planned
        return self._judge(exchange.notes.get(CLUSTER))

    def decide(self, exchange: Exchange, ask: Ask, result: Result,
               batch: Batch) -> Outcome | None:
        return self._judge(batch.cluster) if result.status >= 0 else None

    def _judge(self, cluster: Cluster | None) -> Outcome | None:
        s = self.settings
        if cluster is None or cluster is PENDING:
            return None
        if s.max_accounts is not None and cluster.size > s.max_accounts:
            return self._denial("linked_accounts", f"max_accounts={s.max_accounts}",
                                "This account is linked to more accounts "
                                f"than this service allows (rule '{self.rule.name}').")
        if s.linked_to == "blocked" and cluster.linked_to_blocked:
            return self._denial("linked_to_blocked", "linked_to=blocked",
                                "This account is linked to an account "
                                f"that is blocked (rule '{self.rule.name}').")
        return None

    def _denial(self, code: str, window: str, message: str) -> Outcome:
        return Outcome(allowed=False, rule=self.rule.name, shadow=self.rule.shadow,
                       status=403, kind="permission", code=code, message=message,
                       window=window)

    async def explain(self, exchange: Exchange) -> RuleExplanation:
        """What ``check`` would decide on the cluster in ``exchange.notes`` (explain
        reads it from the store; this request's own evidence is not recorded). Raises
        ``StoreError`` when reading the cluster failed."""
        miss = when_mismatch(self.when, exchange)
        cluster = cluster_of(exchange) if miss is None else None
        if miss is None and cluster is None:
            miss = "no cluster: the request has no account"
        if miss is not None or cluster is None:
            return skipped(self.rule, miss or "")
        s, found = self.settings, {"id": cluster.id, "size": cluster.size,
                                   "linked_to_blocked": cluster.linked_to_blocked}
        if s.max_accounts is not None:
            size = f"the cluster has {cluster.size} account(s); at most {s.max_accounts} allowed"
            if cluster.size > s.max_accounts:
                return denied(self.rule, size, 403, f"max_accounts={s.max_accounts}",
                              cluster=found)
            return allowed(self.rule, size, cluster=found)
        if cluster.linked_to_blocked:
            return denied(self.rule, "an account of its cluster (or itself) is blocked", 403,
                          "linked_to=blocked", cluster=found)
        return allowed(self.rule, "no account of its cluster is blocked", cluster=found)


def build(rule: Rule, runtime: Runtime) -> LinkageGuard:
    return LinkageGuard(rule, runtime)


KIND = RuleKind(key="linkage", phase=Phase.LINKAGE, parse=parse, build=build, uses_per=False)
