"""Finding a policy's canary settings outside the proxy (forensics CLI)."""

from __future__ import annotations

from guardproxy.canary.ledger import Ledger, open_ledger
from guardproxy.guards.canary import CanarySettings
from guardproxy.policy.model import Policy, Rule
from guardproxy.state import open_state


def canary_rule(policy: Policy) -> Rule:
    for rule in policy.rules:
        if rule.kind == "canary":
            return rule
    raise ValueError(f"{policy.source}: the policy has no canary rule")


def canary_settings(policy: Policy) -> CanarySettings:
    settings: CanarySettings = canary_rule(policy).settings
    return settings


def ledger_from_policy(policy: Policy) -> Ledger:
    for rule in policy.rules:
        settings = rule.settings
        if rule.kind == "canary" and settings.ledger is not None:
            state = open_state(policy.state, policy.key_prefix)
            return open_ledger(settings.ledger.store, state_uri=policy.state,
                               key_prefix=policy.key_prefix, redis_client=state.redis,
                               max_entries=settings.ledger.max_entries,
                               path=settings.ledger.path)
    raise ValueError(f"{policy.source}: no canary rule keeps a ledger")


def known_accounts(policy: Policy) -> list[str]:
    return sorted({account.id for account in policy.keys.values()})
