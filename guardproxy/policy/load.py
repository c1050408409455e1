"""Load and validate a policy file into a ``Policy``, or raise ``PolicyError`` with every
problem found, each naming ``file:line: field.path: message``."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guardproxy.audit.settings import parse_audit, parse_rule_audit
from guardproxy.dialects import DIALECTS
from guardproxy.errors import PolicyError, Problem
from guardproxy.guards import per_keys, rule_kinds
from guardproxy.identity.keys import read_accounts
from guardproxy.linkage.settings import parse_linkage
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
from guardproxy.policy.source import LocDict, LocList, read_yaml
from guardproxy.policy.values import (
    has_credentials,
    header_name,
    header_value,
    parse_url,
    redact_url,
)
from guardproxy.policy.values import parse_duration as parse_duration  # re-exported
from guardproxy.policy.values import parse_size as parse_size  # re-exported
from guardproxy.state import validate_uri
from guardproxy.tokens import load_tokenizer

TOP_KEYS = ("version", "upstream", "state", "key_prefix", "accounts", "clients", "admin",
            "tokenizer", "rules", "unguarded", "linkage", "audit")
UPSTREAM_KEYS = ("url", "dialect", "headers", "timeout", "connect_timeout", "cap_field",
                 "stream_usage", "max_event_bytes")
COMMON_RULE_KEYS = ("name", "when", "mode", "per", "on_store_error", "audit")
CAP_FIELDS = ("max_tokens", "max_completion_tokens", "both")
STREAM_USAGE = ("inject", "never")
# framing headers belong to the proxy: a fixed value would corrupt every request
_FRAMING = {"content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
            "keep-alive", "proxy-connection"}


def load_policy(path: str | Path, env: Mapping[str, str] | None = None) -> Policy:
    """Load and validate a policy (and its accounts file).

    Raises ``PolicyError`` carrying every problem found (never an empty list, never
    another exception, whatever the files contain), sorted by file and line.
    """
    source = Path(path)
    problems: list[Problem] = []
    policy = _parse(source, os.environ if env is None else env, problems)
    if problems or policy is None:
        main = str(source)
        if not problems:
            problems.append(Problem(main, 0, "", "the policy could not be loaded"))
        raise PolicyError(sorted(problems, key=lambda p: (p.file != main, p.file, p.line)))
    return policy


def _parse(source: Path, env: Mapping[str, str], problems: list[Problem]) -> Policy | None:
    doc = read_yaml(source, env, problems)
    if doc is None:
        if not problems:
            problems.append(Problem(str(source), 1, "", "policy file is empty"))
        return None
    if not isinstance(doc, LocDict):
        problems.append(Problem(str(source), 1, "", "policy must be a mapping "
                                "(version: 1, upstream: …, accounts: …, rules: …)"))
        return None
    top = Reader(str(source), doc, "", problems)
    top.allow(TOP_KEYS, required=("version",))
    version = top.typed("version", int)
    if version is not None and version != 1:
        top.problem(f"unsupported version {version} (this guardproxy reads version 1)", "version")
    upstream = _upstream(top)
    state = top.parsed("state", _state_uri, "memory://")
    key_prefix = top.string("key_prefix", "guardproxy") or "guardproxy"
    accounts, keys = _accounts(top, source, env)
    clients = _clients(top)
    rules = _rules(top)
    tokenizer = top.parsed("tokenizer", _tokenizer, None)
    admin = top.child("admin")
    admin_token = admin_listen = None
    if admin is not None:
        admin.allow(("token", "listen"))
        admin_token = admin.string("token") or None
        admin_listen = admin.parsed("listen", parse_listen, None)
    linkage = parse_linkage(top)
    if linkage is None:
        for rule in rules:  # without evidence, a cluster is every account alone: say so
            if rule.kind == "linkage" or "cluster" in rule.per:
                top.problems.append(Problem(top.file, rule.line, f"rules.{rule.name}",
                                            "needs a top-level 'linkage:' section (clusters "
                                            "come from its signals)"))
    return Policy(source=source, upstream=upstream, state=state, key_prefix=key_prefix,
                  accounts=accounts, clients=clients, rules=rules, admin_token=admin_token,
                  unguarded=_unguarded(top), keys=keys, tokenizer=tokenizer,
                  linkage=linkage, audit=parse_audit(top), admin_listen=admin_listen)


def parse_listen(value: Any) -> tuple[str, int]:
    """``admin.listen``: ``HOST:PORT`` (``[::1]:9090`` for IPv6) -> (host, port)."""
    text = str(value).strip() if isinstance(value, str | int) else ""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def _state_uri(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a URI string such as memory:// or redis://127.0.0.1:6379/0")
    try:
        validate_uri(value)
    except ValueError as exc:  # the URI may hold a Redis password: never echo it
        raise ValueError(str(exc).replace(repr(value), repr(redact_url(value)))) from None
    return value


def _tokenizer(value: Any) -> Any:
    try:
        return load_tokenizer(value)
    except ValueError:
        raise
    except Exception as exc:  # importing a module may fail in any way (".x", syntax…)
        raise ValueError(f"cannot load the tokenizer: {type(exc).__name__}: {exc}") from None


def _upstream(top: Reader) -> UpstreamConfig:
    """``upstream:`` may be left out (embedded use: the wrapped app is the upstream);
    then the URL is "" and ``guardproxy serve`` asks for one."""
    r = top.child("upstream")
    if r is None:
        return UpstreamConfig(url="", dialect="openai", headers=(), timeout=300.0,
                              connect_timeout=10.0)
    r.allow(UPSTREAM_KEYS)
    url = r.parsed("url", parse_url, "")
    dialect = r.choice("dialect", DIALECTS, "openai")
    headers = _headers(r)
    if url and has_credentials(url) and any(k.lower() == "authorization" for k, _ in headers):
        r.problem("the URL's user:password and upstream.headers' Authorization would both "
                  "set Authorization: keep one of them", "url")
    cap_field = None
    if r.raw("cap_field") is not None:
        cap_field = r.choice("cap_field", CAP_FIELDS, CAP_FIELDS[0])
        if dialect == "anthropic" and cap_field != "max_tokens":
            r.problem("the anthropic dialect caps output with max_tokens only", "cap_field")
    return UpstreamConfig(
        url=url, dialect=dialect, headers=headers,
        timeout=r.duration("timeout", 300.0),
        connect_timeout=r.duration("connect_timeout", 10.0),
        cap_field=cap_field,
        stream_usage=r.choice("stream_usage", STREAM_USAGE, "inject"),
        max_event_bytes=r.size("max_event_bytes", 4 << 20),
    )


def _headers(upstream: Reader) -> tuple[tuple[str, str], ...]:
    """Header name -> value; a value left empty (or a bare "Bearer") is dropped, so that
    ``Bearer ${KEY:-}`` sends nothing when KEY is unset."""
    r = upstream.child("headers")
    if r is None:
        return ()
    out: dict[str, tuple[str, str]] = {}
    for name in r.node:
        value = r.string(name)
        try:
            header_name(name)
            header_value(value or "")
        except ValueError as exc:
            r.problem(str(exc), name)
            continue
        if name.lower() in _FRAMING:
            r.problem("set by the proxy itself; remove it", name)
        elif name.lower() in out:
            r.problem(f"duplicate header (also written as {out[name.lower()][0]!r})", name)
        elif value is not None and value.strip() not in ("", "Bearer"):
            out[name.lower()] = (name, value)
    return tuple(out.values())


def _accounts(top: Reader, source: Path,
              env: Mapping[str, str]) -> tuple[AccountsConfig, dict[str, Any]]:
    r = top.child("accounts")
    if r is None:
        if top.raw("accounts") is None:
            top.problem("missing required key 'accounts' (keys: FILE or trust_header: NAME)")
        return AccountsConfig(None, None), {}
    r.allow(("keys", "trust_header"))
    keys_name = r.string("keys")
    trust = r.string("trust_header")
    if keys_name == "":
        r.problem("must name an accounts file", "keys")
    if trust is not None:
        try:
            header_name(trust)
        except ValueError as exc:
            r.problem(str(exc), "trust_header")
    if not keys_name and not trust:
        r.problem("give 'keys' (an accounts file) or 'trust_header' (or both)")
    keys_file = (source.parent / keys_name) if keys_name else None
    keys = {}
    if keys_file is not None:
        try:
            found = keys_file.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL…
            found = False
        if not found:
            r.problem(f"accounts file not found: {keys_file}", "keys")
        else:
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
    return ClientsConfig(tuple(nets), r.size("max_body_bytes", 16 * 2**20))


def _unguarded(top: Reader) -> tuple[str, ...]:
    """Path globs that skip the guards (``/health``, ``/docs``…): each starts with "/"."""
    paths = top.string_list("unguarded")
    raw = top.raw("unguarded")
    for i, path in enumerate(paths):
        if not path.startswith("/"):
            line = raw.item_lines[i] if isinstance(raw, LocList) else top.line("unguarded")
            top.problems.append(Problem(top.file, line, f"unguarded[{i}]",
                                        f"a path glob must start with '/', got {path!r}"))
    return paths


def _rules(top: Reader) -> tuple[Rule, ...]:
    kinds = rule_kinds()
    known_per = per_keys()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for r in top.children("rules"):
        name = r.string("name", required=True) or ""
        if r.has("name") and not name.strip():
            r.problem("must not be empty", "name")
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
            per = r.string_list("per", nonempty=True) or ("account",)
            for p in per:
                if p not in known_per and not (p.startswith("header:") and _is_header(p[7:])):
                    r.problem(f"unknown per key {p!r} (expected one of "
                              f"{', '.join(sorted(known_per))}, header:<name>)", "per")
        elif r.has("per"):
            r.problem(f"'{kind.key}' rules take no 'per'", "per")
        on_store_error = r.choice("on_store_error", ("deny", "allow"), "deny")
        rules.append(Rule(name=name, kind=kind.key, mode=mode,  # type: ignore[arg-type]
                          when=_when(r), per=per, settings=kind.parse(r), line=r.line(),
                          on_store_error=on_store_error,  # type: ignore[arg-type]
                          audit_include=parse_rule_audit(r)))
    return tuple(rules)


def _is_header(name: str) -> bool:
    try:
        return bool(header_name(name))
    except ValueError:
        return False


def _when(rule: Reader) -> Match:
    r = rule.child("when")
    if r is None:
        if rule.has("when") and rule.raw("when") is None:
            rule.problem("no conditions: give some or remove 'when'", "when")
        return Match()
    r.allow(MATCH_FIELDS)
    # an empty list would match nothing: the rule would silently never apply
    spec = {f: r.string_list(f, nonempty=True) for f in MATCH_FIELDS
            if f != "header" and r.has(f)}
    for f in spec:
        if r.raw(f) is None:
            r.problem("no value: give one (or a list) or remove the key", f)
    headers: dict[str, tuple[str, ...]] = {}
    h = r.child("header")
    if h is not None:
        for name in h.node:
            try:
                header_name(name)
            except ValueError as exc:
                h.problem(str(exc), name)
            if h.raw(name) is None:
                h.problem("no value: give one, or a glob such as '*'", name)
            headers[name] = h.string_list(name, nonempty=True)
    return Match.build(spec, headers)
