"""Finding a policy's canary settings outside the proxy: forensics CLI and admin API.

``known_accounts`` lists the accounts they score and ``population_of`` (re-exported
from ``guardproxy.canary.index``) decides the Bonferroni count, the same way for both.
"""

from __future__ import annotations

import os

from guardproxy.canary.index import population_of
from guardproxy.canary.ledger import Ledger, open_ledger
from guardproxy.guards.canary import CanarySettings
from guardproxy.policy.model import Policy, Rule
from guardproxy.policy.source import read_yaml
from guardproxy.state import open_state

__all__ = ["canary_rule", "canary_settings", "known_accounts", "ledger_from_policy",
           "population_of"]


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
                               path=settings.ledger.path,
                               max_age=settings.ledger.max_age)
    raise ValueError(f"{policy.source}: no canary rule keeps a ledger")


def known_accounts(policy: Policy) -> list[str]:
    """Every account id of the policy's accounts file, sorted, with or without a key hash:
    an account with none can still be named by a trusted gateway (``trust_header``) and
    receive marked outputs. The one list the CLI and the admin API both score."""
    ids = {account.id for account in policy.keys.values()}
    path = policy.accounts.keys_file
    if path is not None:
        # read_accounts keeps only accounts with a key hash: read the ids again
        doc = read_yaml(path, os.environ, [])
        entries = doc.get("accounts") if isinstance(doc, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            account = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(account, str) and account.strip():
                ids.add(account)
    return sorted(ids)
