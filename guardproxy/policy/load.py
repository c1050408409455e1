"""Load and validate a policy file into a ``Policy``, or raise ``PolicyError`` with every
problem found, each naming ``file:line: field.path: message``."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guardproxy.dialects import DIALECTS
from guardproxy.errors import PolicyError, Problem
from guardproxy.guards import per_keys, rule_kinds
from guardproxy.identity.keys import read_accounts
from guardproxy.policy.match import MATCH_FIELDS, Match
from guardproxy.policy.model import (
    AccountsConfig,
    ClientsConfig,
    IPNetwork,
    Policy,
    Rule,
    UpstreamConfig,
)
from guardproxy.policy.reader import Reader
from guardproxy.policy.source import LocDict, read_yaml
from guardproxy.state import validate_uri
from guardproxy.tokens import load_tokenizer

TOP_KEYS = ("version", "upstream", "state", "key_prefix", "accounts", "clients", "admin",
            "tokenizer", "rules")
COMMON_RULE_KEYS = ("name", "when", "mode", "per", "on_store_error")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, None: 1}


def parse_duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {value!r} (expected e.g. 300s, 5m, 250ms)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"invalid size {value!r} (expected e.g. 16MiB, 65536)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def load_policy(path: str | Path, env: Mapping[str, str] | None = None) -> Policy:
    source = Path(path)
    problems: list[Problem] = []
    policy = _parse(source, os.environ if env is None else env, problems)
    if problems or policy is None:
        main = str(source)
        raise PolicyError(sorted(problems, key=lambda p: (p.file != main, p.file, p.line)))
    return policy


def _parse(source: Path, env: Mapping[str, str], problems: list[Problem]) -> Policy | None:
    doc = read_yaml(source, env, problems)
    if doc is None:
        if not problems:
            problems.append(Problem(str(source), 1, "", "policy file is empty"))
        return None
    if not isinstance(doc, LocDict):
        problems.append(Problem(str(source), 1, "", "policy must be a mapping"))
        return None
    top = Reader(str(source), doc, "", problems)
    top.allow(TOP_KEYS, required=("version", "upstream"))
    version = top.typed("version", int)
    if version is not None and version != 1:
        top.problem(f"unsupported version {version} (this guardproxy reads version 1)", "version")
    upstream = _upstream(top)
    state = top.parsed("state", _state_uri, "memory://")
    key_prefix = top.string("key_prefix", "guardproxy") or "guardproxy"
    accounts, keys = _accounts(top, source, env)
    clients = _clients(top)
    rules = _rules(top)
    tokenizer = top.parsed("tokenizer", load_tokenizer, None)
    admin = top.child("admin")
    admin_token = None
    if admin is not None:
        admin.allow(("token",))
        admin_token = admin.string("token") or None
    if upstream is None:
        return None
    return Policy(source=source, upstream=upstream, state=state, key_prefix=key_prefix,
                  accounts=accounts, clients=clients, rules=rules, admin_token=admin_token,
                  keys=keys, tokenizer=tokenizer)


def _state_uri(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a URI string such as memory:// or redis://127.0.0.1:6379/0")
    validate_uri(value)
    return value


def _url(value: Any) -> str:
    text = str(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _upstream(top: Reader) -> UpstreamConfig | None:
    r = top.child("upstream")
    if r is None:
        return None
    r.allow(("url", "dialect", "headers", "timeout", "connect_timeout"), required=("url",))
    url = r.parsed("url", _url, "")
    dialect = r.choice("dialect", DIALECTS, "openai")
    headers = r.string_map("headers")
    return UpstreamConfig(
        url=url, dialect=dialect,
        headers=tuple((k, v) for k, v in headers.items() if v.strip() not in ("", "Bearer")),
        timeout=r.parsed("timeout", parse_duration, 300.0),
        connect_timeout=r.parsed("connect_timeout", parse_duration, 10.0),
    )


def _accounts(top: Reader, source: Path,
              env: Mapping[str, str]) -> tuple[AccountsConfig, dict[str, Any]]:
    r = top.child("accounts")
    if r is None:
        top.problem("missing required key 'accounts' (keys: FILE or trust_header: NAME)")
        return AccountsConfig(None, None), {}
    r.allow(("keys", "trust_header"))
    keys_name = r.string("keys")
    trust = r.string("trust_header")
    if keys_name is None and trust is None:
        r.problem("give 'keys' (an accounts file) or 'trust_header' (or both)")
    keys_file = (source.parent / keys_name) if keys_name else None
    keys = {}
    if keys_file is not None and not keys_file.is_file():
        r.problem(f"accounts file not found: {keys_file}", "keys")
    elif keys_file is not None:
        keys = read_accounts(keys_file, env, top.problems)
    return AccountsConfig(keys_file, trust.lower() if trust else None), keys


def _network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {value!r}") from None


def _clients(top: Reader) -> ClientsConfig:
    r = top.child("clients")
    if r is None:
        return ClientsConfig((), 16 * 2**20)
    r.allow(("trusted_proxies", "max_body_bytes"))
    nets = []
    for value in r.string_list("trusted_proxies"):
        try:
            nets.append(_network(value))
        except ValueError as exc:
            r.problem(str(exc), "trusted_proxies")
    return ClientsConfig(tuple(nets), r.parsed("max_body_bytes", parse_size, 16 * 2**20))


def _rules(top: Reader) -> tuple[Rule, ...]:
    kinds = rule_kinds()
    known_per = per_keys()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for r in top.children("rules"):
        name = r.string("name", required=True) or ""
        if name in seen:
            r.problem(f"duplicate rule name {name!r} (first at line {seen[name]})", "name")
        elif name:
            seen[name] = r.line("name")
        present = [k for k in kinds if r.has(k)]
        if len(present) != 1:
            wanted = ", ".join(sorted(kinds))
            r.problem(f"a rule needs exactly one of: {wanted}" if not present
                      else f"a rule has one kind; found {', '.join(present)}")
            r.allow((*COMMON_RULE_KEYS, *kinds))
            _when(r)
            continue
        kind = kinds[present[0]]
        r.allow((*COMMON_RULE_KEYS, kind.key, *kind.fields))
        mode = r.choice("mode", ("enforce", "shadow"), "enforce")
        per: tuple[str, ...] = ()
        if kind.uses_per:
            per = r.string_list("per") or ("account",)
            for p in per:
                if p not in known_per and not (p.startswith("header:") and len(p) > 7):
                    r.problem(f"unknown per key {p!r} (expected one of "
                              f"{', '.join(sorted(known_per))}, header:<name>)", "per")
        elif r.has("per"):
            r.problem(f"'{kind.key}' rules take no 'per'", "per")
        on_store_error = r.choice("on_store_error", ("deny", "allow"), "deny")
        rules.append(Rule(name=name, kind=kind.key, mode=mode,  # type: ignore[arg-type]
                          when=_when(r), per=per, settings=kind.parse(r), line=r.line(),
                          on_store_error=on_store_error))  # type: ignore[arg-type]
    return tuple(rules)


def _when(rule: Reader) -> Match:
    r = rule.child("when")
    if r is None:
        return Match()
    r.allow(MATCH_FIELDS)
    spec = {f: r.string_list(f) for f in MATCH_FIELDS if f != "header" and r.has(f)}
    headers: dict[str, tuple[str, ...]] = {}
    h = r.child("header")
    if h is not None:
        headers = {name: h.string_list(name) for name in h.node}
    return Match.build(spec, headers)
