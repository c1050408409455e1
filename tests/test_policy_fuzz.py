"""Whatever a policy or accounts file contains, loading it gives a ``Policy`` or a
``PolicyError`` with one-line problems, and ``guardproxy check`` prints only
``FILE:LINE: ...`` lines: never a traceback.

Documents are built from the policy's own keys with random scalars and structures
(so that parsing gets past the top level), then mutated as text: YAML tags, anchors,
aliases, merge keys, huge numbers, invalid UTF-8. The shipped policies are mutated too.
``GUARDPROXY_FUZZ_EXAMPLES`` raises the example counts for a long run by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.cli import main
from guardproxy.errors import PolicyError
from guardproxy.guards import rule_kinds
from guardproxy.identity.keys import read_accounts
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("GUARDPROXY_FUZZ_EXAMPLES", "150"))
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ENV = {"A": "1", "B": "http://127.0.0.1:9", "REF": "${A}", "NL": "two\nlines",
       "GUARDPROXY_CANARY_SECRET": "a-fuzz-secret-of-enough-length"}

KEYS = sorted({
    "version", "upstream", "state", "key_prefix", "accounts", "clients", "admin",
    "tokenizer", "rules", "unguarded",
    "url", "dialect", "headers", "timeout", "connect_timeout", "cap_field", "stream_usage",
    "max_event_bytes", "keys", "trust_header", "trusted_proxies", "max_body_bytes", "token",
    "name", "when", "mode", "per", "on_store_error",
    "tier", "org", "account", "model", "path", "method", "header",
    "secret", "marks", "tripwire", "rate", "ledger", "store", "max_entries",
    "id", "key_sha256", "attributes", "Authorization", "<<",
    *rule_kinds(), *(f for kind in rule_kinds().values() for f in kind.fields),
})
WORDS = [
    "1", "0", "-1", "2", "300s", "0s", "-5s", "250ms", "5m", "2h", "16MiB", "0b", "64kb",
    "20/minute", "0/minute", "1/second; 5/day", "lots", "http://127.0.0.1:9",
    "http://user:pass@127.0.0.1:9", "https://h/x?q=1", "ftp://x", "memory://",
    "redis://:pw@127.0.0.1:1/0", "mongo://x", "${A}", "${NOPE}", "${A:-d}", "${NOPE:-}",
    "${NOPE:-${A}}", "${REF}", "${NL}", "${", "$}", "free", "pro", "default", "openai",
    "anthropic", "enforce", "shadow", "account", "org", "ip", "model", "header:x-team",
    "header:", "clamp", "reject", "lexical", "file", "state", "/v1/*", "/health", "health",
    "gpt-4*", "[", "127.0.0.1/32", "10.0.0.0/8", "::1/128", "300.1.1.1", "a" * 64,
    "max_tokens", "max_completion_tokens", "both", "inject", "never", "Bearer x",
    "accounts.yaml", "missing.yaml", "x\x00y", "n" * 300, "total", "prompt", "sliding-window",
    ".x:y", "nosuchmodule_gp:f", "json:dumps", "", " ", "x-account-id", "bad header",
]
# spliced into the YAML text where a value starts: tags, anchors, aliases, odd numbers
PREFIXES = ["!!int ", "!!bool ", "!!float ", "!!timestamp ", "!!binary ", "!!set ", "!!omap ",
            "!!python/object:os.system ", "!!python/tuple ", "!foo ", "!!str ", "!!null ",
            "!!map ", "!!seq ", "&a ", "&b "]
VALUES = ["&a [*a]", "&b {k: *b}", "&a {<<: *a}", "*a", "*b", "!!int abc", "!!int",
          "!!bool maybe", "!!float x", "!!binary aGk=", "!!python/name:os.system", "!foo 1",
          "!!timestamp 2024-13-45", "1.0e+999", ".inf", "-.inf", ".nan", "9" * 30, "9" * 5000,
          "0x" + "f" * 40, "0x" + "f" * 4000, "0o777", "1_000", "0b101", "1:30", "2024-01-01",
          "'\u00b2'", '"\\U7fffffff"', "'${A:-${B}}'", "'${NOPE}'", "'a\nb'", "~", "="]
# whole entries, inserted as a line of a mapping (at its indentation)
ENTRIES = ["<<: *a", "<<: {x: 1}", "<<: [*a, *b]", "<<: 1", "? [k]", "? {k: v}", "1: x",
           "null: x", "on: x", "'${NOPE}': x", "${A}: x", '"\\x1f": x', "version: 1"]
# anywhere at all
NASTY = ["---\n", "...\n", "%YAML 1.1\n---\n", "\t", "{", "}", "[", "]", "\n- ", ": ", ", ",
         "'", '"', "\\", "\x00", "\u2028", "\x85", "\ufeff", "|\n  x\n", "${A}", "=", "@",
         "`", "#", "\n" + "[" * 200, *PREFIXES, *VALUES]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(WORDS),
)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
rules = st.lists(st.dictionaries(st.sampled_from(KEYS), structures, max_size=6)
                 .map(lambda r: {"name": "r", **r}), max_size=3)
# mostly well-formed policies, so that parsing reaches the sections and the rules
policies = st.builds(
    lambda extra, rs: {"version": 1, "accounts": {"trust_header": "x-account-id"},
                       **extra, "rules": rs},
    st.dictionaries(st.sampled_from(KEYS), structures, max_size=5), rules,
) | st.dictionaries(st.sampled_from(KEYS), structures, max_size=6) | structures


@st.composite
def mutated(draw: st.DrawFn, text: str) -> bytes:
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["value", "value", "prefix", "entry", "insert", "delete",
                                   "line"]))
        starts = [m.end() for m in re.finditer(r"(?:: |- |\[|, )(?=\S)", text)]
        lines = text.splitlines(keepends=True)
        if op in ("value", "prefix") and starts:
            at = draw(st.sampled_from(starts))
            if op == "prefix":
                text = text[:at] + draw(st.sampled_from(PREFIXES)) + text[at:]
            else:  # the value there (up to the end of its line, or a flow separator)
                end = re.compile(r"[,\]}\n#]|$").search(text, at)
                stop = end.start() if end else len(text)
                text = text[:at] + draw(st.sampled_from(VALUES) | st.sampled_from(WORDS)
                                        ) + text[stop:]
        elif op == "entry" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            line = lines[i]
            indent = line[:len(line) - len(line.lstrip(" -"))].replace("-", " ")
            entry = draw(st.sampled_from(ENTRIES))
            if entry.startswith("? "):
                entry += f"\n{indent}: v"
            lines.insert(i, indent + entry + "\n")
            text = "".join(lines)
        elif op == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(NASTY) | st.text(max_size=4)) + text[at:]
        elif op == "delete":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif op == "line" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
            text = "".join(lines)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # now and then: not UTF-8 at all
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + data[at:]
    return data


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    doc: Any = draw(policies)
    text = yaml.safe_dump(doc, default_flow_style=draw(st.sampled_from([None, True, False])),
                          allow_unicode=draw(st.booleans()))
    return draw(mutated(text))


def shipped(name: str) -> str:
    return (REPO / "policies" / name).read_text(encoding="utf-8")


SHIPPED = sorted(p.name for p in (REPO / "policies").glob("*.yaml"))
ACCOUNTS = shipped("accounts.yaml")


def assert_loads_or_fails_cleanly(path: Path) -> None:
    try:
        policy = load_policy(path, ENV)
    except PolicyError as exc:
        assert exc.problems, "a PolicyError names at least one problem"
        for problem in exc.problems:
            assert "\n" not in str(problem) and "\r" not in str(problem), problem
            if problem.path in ("upstream.url", "state"):  # the fields that hold secrets
                assert "pass@" not in str(problem) and ":pw@" not in str(problem), problem
    else:
        assert isinstance(policy, Policy)


def assert_check_prints_problem_lines(path: Path) -> None:
    result = CliRunner().invoke(main, ["check", str(path)], env=ENV)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1), result.output
    # problems and warnings may name the policy's accounts file, next to it
    line = re.compile(rf"^({re.escape(str(path))}|{re.escape(str(path.parent))}/[^/:]+)"
                      rf":\d+: .+$|^{re.escape(str(path))}: ok \(.*\)$")
    for out in result.output.splitlines():
        assert line.match(out), f"not a FILE:LINE line: {out!r}"
    assert "Traceback" not in result.output


@FUZZ
@given(data=documents())
def test_random_documents(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "accounts.yaml").write_text(ACCOUNTS)
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    assert_loads_or_fails_cleanly(path)
    assert_check_prints_problem_lines(path)


@FUZZ
@given(name=st.sampled_from(SHIPPED), data=st.data())
def test_mutated_shipped_policies(tmp_path: Path, name: str, data: st.DataObject) -> None:
    (tmp_path / "accounts.yaml").write_text(ACCOUNTS)
    path = tmp_path / name  # accounts.yaml itself is mutated in place
    path.write_bytes(data.draw(mutated(shipped(name))))
    assert_loads_or_fails_cleanly(path)
    assert_check_prints_problem_lines(path)


@FUZZ
@given(data=st.data())
def test_mutated_accounts_files(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "accounts.yaml"
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(mutated(ACCOUNTS)))
    else:
        entries = data.draw(st.lists(st.dictionaries(st.sampled_from(KEYS), structures,
                                                     max_size=5), max_size=3))
        doc = data.draw(st.sampled_from([{"accounts": entries}, entries]))
        path.write_bytes(data.draw(mutated(yaml.safe_dump(doc))))
    problems: list[Any] = []
    accounts = read_accounts(path, ENV, problems)
    assert isinstance(accounts, dict)
    assert all("\n" not in str(p) for p in problems)
    policy = shipped("default.yaml")
    (tmp_path / "default.yaml").write_text(policy)
    assert_loads_or_fails_cleanly(tmp_path / "default.yaml")


# every field of a full policy, in turn, gets each of these (YAML as written)
FULL: dict[str, Any] = {
    "version": 1,
    "upstream": {"url": "http://127.0.0.1:9", "dialect": "openai", "headers": {"X-A": "b"},
                 "timeout": "5s", "connect_timeout": "1s", "cap_field": "both",
                 "stream_usage": "inject", "max_event_bytes": "1MiB"},
    "state": "memory://", "key_prefix": "gp", "tokenizer": None,
    "accounts": {"keys": "accounts.yaml", "trust_header": "x-account-id"},
    "clients": {"trusted_proxies": ["10.0.0.0/8"], "max_body_bytes": "1MiB"},
    "admin": {"token": "t" * 20}, "unguarded": ["/health"],
    "rules": [
        {"name": "q", "quota": "5/minute", "per": ["account", "model"], "mode": "enforce",
         "on_store_error": "deny", "strategy": "moving-window",
         "when": {"tier": "free", "org": "o", "account": "a", "model": "m*", "path": "/v1/*",
                  "method": "POST", "header": {"x-team": "t"}}},
        {"name": "b", "budget": "100/day", "count": {"prompt": 1, "completion": 2},
         "on_exhausted": "clamp", "min_tokens": 5, "default_max_tokens": 50,
         "lease_ttl": "60s"},
        {"name": "c", "canary": {"secret": "s" * 20, "marks": ["lexical"], "tripwire": False,
                                 "rate": 0.5, "ledger": {"store": "file", "path": "l.jsonl",
                                                         "max_entries": 10}}},
    ],
}
TROUBLE = ["!!int abc", "!!bool maybe", "!!python/name:os.system", "!!binary aGk=", "!foo 1",
           "&a [*a]", "&b {k: *b}", "1.0e+999", ".nan", "9" * 30, "9" * 5000, "0x" + "f" * 4000,
           '"\\u00b2"', "'${A:-${B}}'", "''", "0", "-1", "true", "~", "[]", "{}", "[[1]]",
           "{1: x}", '"n' + "n" * 300 + '"', "'.x:y'", '"x\\0y"', "'a\nb'", "2024-01-01"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    out = []
    for key, value in items:
        out += [(*prefix, key), *_paths(value, (*prefix, key))]
    return out


def _groups(paths: list[tuple[Any, ...]], size: int = 8) -> list[list[tuple[Any, ...]]]:
    """Paths packed into groups of unrelated fields (none inside another), so that one
    document can test several fields at once: a crash in any of them still shows."""
    groups: list[list[tuple[Any, ...]]] = []
    for path in paths:
        for group in groups:
            if len(group) < size and not any(
                    p[:len(path)] == path or path[:len(p)] == p for p in group):
                group.append(path)
                break
        else:
            groups.append([path])
    return groups


def test_every_field_with_every_troublesome_value(tmp_path: Path) -> None:
    (tmp_path / "accounts.yaml").write_text(ACCOUNTS)
    path = tmp_path / "p.yaml"
    groups = _groups(_paths(FULL))
    assert sum(map(len, groups)) == len(_paths(FULL)) > 60
    for group in groups:
        doc = yaml.safe_load(yaml.safe_dump(FULL))
        for field in group:
            node = doc
            for key in field[:-1]:
                node = node[key]
            node[field[-1]] = "@@X@@"
        text = yaml.safe_dump(doc)
        for raw in TROUBLE:
            path.write_text(text.replace("'@@X@@'", raw), encoding="utf-8")
            assert_loads_or_fails_cleanly(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_unmutated_shipped_files_check_clean(tmp_path: Path, name: str) -> None:
    (tmp_path / "accounts.yaml").write_text(ACCOUNTS)
    path = tmp_path / name
    path.write_text(shipped(name))
    result = CliRunner().invoke(main, ["check", str(path)], env=ENV)
    assert result.exit_code == 0, result.output
