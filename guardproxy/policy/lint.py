"""Warnings about a valid policy that probably does not do what was meant.

``guardproxy check`` prints them as ``FILE:LINE: warning: field: message`` (the exit
code stays 0) and ``guardproxy serve`` prints them at start-up:

- an account (or a whole tier) that no enforced ``quota`` or ``budget`` rule can apply
  to has no limit at all: ``keys add`` without ``--tier`` gives tier ``default``,
  and a policy with rules for ``free`` and ``pro`` only leaves it unlimited, silently;
- the same for accounts named by ``trust_header`` that are not in the accounts file
  (they get tier ``default``);
- an ``unguarded`` glob that takes in a model endpoint (every rule skipped there);
- the public demo keys of the README in an accounts file.

A rule "can apply" to an account when its ``when`` can match the account's tier, org
and id; conditions on anything else (model, path, method, headers) cover the account
partly, which counts as covered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path

from guardproxy.errors import Problem
from guardproxy.policy.demo import DEMO_ACCOUNTS, DEMO_KEY_HASHES
from guardproxy.policy.model import Account, Policy, Rule
from guardproxy.policy.source import LocDict, LocList, one_line, outline

LIMIT_KINDS = ("quota", "budget")
MODEL_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
               "/v1/embeddings")


def format_warning(warning: Problem) -> str:
    return one_line(f"{warning.file}:{warning.line}: warning: {warning.path or '<root>'}: "
                    f"{warning.message}")


def policy_warnings(policy: Policy) -> list[Problem]:
    """Every warning about ``policy``, in file order (the policy's, then its accounts')."""
    limits = [r for r in policy.rules if r.kind in LIMIT_KINDS and not r.shadow]
    found = [*_trusted_unlimited(policy, limits), *_unguarded_model_paths(policy)]
    if policy.accounts.keys_file is not None:
        found += _unlimited_accounts(policy.accounts.keys_file, policy.keys, limits)
        if policy.accounts.keys_file.resolve() != DEMO_ACCOUNTS.resolve():
            found += demo_key_warnings(policy.accounts.keys_file, policy.keys)
    return found


def demo_key_warnings(keys_file: Path, keys: Mapping[str, Account]) -> list[Problem]:
    """The README's public demo keys, wherever they are still accepted."""
    lines = _account_lines(keys_file)
    found = []
    for digest, key in DEMO_KEY_HASHES.items():
        account = keys.get(digest)
        if account is not None:
            i, line = lines.get(account.id, (None, 0))
            found.append(Problem(str(keys_file), line, _item(i, "key_sha256"),
                                 f"account {account.id!r} accepts the public demo key "
                                 f"{key!r}: delete it before exposing the proxy"))
    return found


def _covers(rule: Rule, account: Account) -> bool:
    return rule.when.could_match({"tier": account.tier, "org": account.org,
                                  "account": account.id})


def _unlimited_accounts(keys_file: Path, keys: Mapping[str, Account],
                        limits: list[Rule]) -> list[Problem]:
    by_tier: dict[str, list[Account]] = {}
    for account in {a.id: a for a in keys.values()}.values():
        if not any(_covers(rule, account) for rule in limits):
            by_tier.setdefault(account.tier, []).append(account)
    lines = _account_lines(keys_file)
    found = []
    for tier, accounts in by_tier.items():
        names = ", ".join(repr(a.id) for a in accounts[:5])
        if len(accounts) > 5:
            names += f" and {len(accounts) - 5} more"
        hint = (" ('keys add' without --tier gives tier default)" if tier == "default"
                else "")
        i, line = lines.get(accounts[0].id, (None, 0))
        found.append(Problem(
            str(keys_file), line, _item(i, "tier"),
            f"no enforced quota or budget rule applies to tier {tier!r}{hint}: "
            f"{'account' if len(accounts) == 1 else 'accounts'} {names} "
            f"{'has' if len(accounts) == 1 else 'have'} no limit at all "
            f"(add a rule with when: {{tier: {tier}}}, or one without 'when')"))
    return found


def _trusted_unlimited(policy: Policy, limits: list[Rule]) -> list[Problem]:
    """A gateway may name any account; unknown ones get tier "default" (identity/resolve)."""
    if policy.accounts.trust_header is None:
        return []
    unknown = {"tier": "default", "org": None, "account": None}
    if any(rule.when.could_match(unknown) for rule in limits):
        return []
    return [Problem(str(policy.source), locate(policy.source, "accounts", "trust_header"),
                    "accounts.trust_header",
                    "accounts named by this header but absent from the accounts file get "
                    "tier 'default', and no enforced quota or budget rule applies to them "
                    "without naming the account or org: they have no limit at all")]


def _unguarded_model_paths(policy: Policy) -> list[Problem]:
    doc = outline(policy.source)
    raw = doc.get("unguarded") if doc is not None else None
    found = []
    for i, glob in enumerate(policy.unguarded):
        hits = [p for p in MODEL_PATHS if fnmatch.fnmatchcase(p, glob)]
        if hits:
            line = (raw.item_lines[i] if isinstance(raw, LocList) and i < len(raw)
                    else locate(policy.source, "unguarded"))
            found.append(Problem(str(policy.source), line, f"unguarded[{i}]",
                                 f"{glob!r} takes in {hits[0]}: model calls there skip "
                                 "every rule"))
    return found


def _account_lines(keys_file: Path) -> dict[str, tuple[int, int]]:
    """Account id -> (index in ``accounts``, line) as written in the accounts file."""
    doc = outline(keys_file)
    items = doc.get("accounts") if doc is not None else None
    if not isinstance(items, LocList):
        return {}
    lines: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(items):
        if isinstance(item, LocDict) and isinstance(item.get("id"), str | int):
            lines.setdefault(str(item["id"]), (i, item.line))
    return lines


def locate(path: Path, *keys: str) -> int:
    """The line of the deepest of ``keys`` (a path into nested mappings) that exists."""
    node = outline(path)
    line = node.line if node is not None else 0
    for key in keys:
        if not isinstance(node, LocDict) or key not in node:
            break
        line = node.key_lines.get(key, line)
        node = node[key]
    return line


def _item(index: int | None, field: str) -> str:
    return f"accounts[{index}].{field}" if index is not None else "accounts"
