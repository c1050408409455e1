from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from guardproxy.cli import main
from guardproxy.errors import PolicyError, Problem
from guardproxy.policy.load import load_policy, parse_duration
from tests.conftest import write_policy

REPO = Path(__file__).resolve().parent.parent


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, env or {})
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "policies").glob("*.yaml")
                                         if p.name != "accounts.yaml"))
def test_shipped_policies_are_valid(name: str) -> None:
    # the variables a policy requires without a default, as its header comment says
    env = {"GUARDPROXY_CANARY_SECRET": "an-example-secret-of-32-characters"}
    policy = load_policy(REPO / "policies" / name, env)
    assert policy.rules
    assert policy.keys, "the example accounts file should load"


def test_full_policy_is_typed(tmp_path: Path) -> None:
    path = write_policy(tmp_path, """
rules:
  - name: free
    when: {tier: free, model: "gpt-4*", method: post}
    quota: 20/minute; 500/day
    per: [account, model]
    strategy: moving-window
  - name: flood
    quota: 600/minute
    per: header:x-team
    mode: shadow
    on_store_error: allow
""")
    policy = load_policy(path, {})
    free, flood = policy.rules
    assert free.per == ("account", "model")
    assert [r.amount for r in free.settings.rates] == [20, 500]
    assert free.settings.strategy == "moving-window"
    assert free.when({"tier": "free", "model": "gpt-4o", "method": "POST"}, {})
    assert not free.when({"tier": "free", "model": "gpt-3.5", "method": "POST"}, {})
    assert flood.shadow and flood.on_store_error == "allow"
    assert flood.per == ("header:x-team",)
    assert policy.upstream.timeout == 5.0
    assert len(policy.keys) == 3


def test_every_problem_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    path = write_policy(tmp_path, """
rules:
  - name: a
    quota: 20/fortnight
    per: acount
  - name: a
    quota: 5/second
    colour: blue
  - name: b
    when: {tierr: free}
  - name: c
    quota: ${NOT_SET}
""")
    lines = problems_of(path)
    f = str(path)
    assert f"{f}:10: rules[0].quota: invalid rate '20/fortnight'" in lines[0]
    assert any(line.startswith(f"{f}:11: rules[0].per: unknown per key 'acount'") for line in lines)
    assert any(line.startswith(f"{f}:12: rules[1].name: duplicate rule name 'a'") for line in lines)
    assert any(line.startswith(f"{f}:14: rules[1].colour: unknown key") for line in lines)
    assert any(line.startswith(f"{f}:15: rules[2]: a rule needs exactly one of") for line in lines)
    assert any(line.startswith(f"{f}:16: rules[2].when.tierr: unknown key") for line in lines)
    assert any(line.startswith(f"{f}:18: rules[3].quota: environment variable NOT_SET")
               for line in lines)


def test_top_level_problems(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nupstream: {url: ftp://x, dialect: cohere}\n"
                    "state: mongo://x\naccounts: {keys: missing.yaml}\nextra: 1\n")
    lines = problems_of(path)
    assert f"{path}:2: upstream.url: must be an http:// or https:// URL, got 'ftp://x'" in lines
    assert any("upstream.dialect: must be one of openai, anthropic" in x for x in lines)
    assert any(x.startswith(f"{path}:3: state: unknown state scheme 'mongo'") for x in lines)
    assert any(x.startswith(f"{path}:4: accounts.keys: accounts file not found") for x in lines)
    assert any(x.startswith(f"{path}:5: extra: unknown key") for x in lines)


def test_yaml_syntax_and_duplicate_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nupstream:\n  url: [unclosed\n")
    assert problems_of(bad)[0].startswith(f"{bad}:")
    assert "invalid YAML" in problems_of(bad)[0]
    dup = tmp_path / "dup.yaml"
    dup.write_text("version: 1\nversion: 1\nupstream: {url: 'http://a'}\n"
                   "accounts: {trust_header: x-account}\n")
    assert f"{dup}:2: version: duplicate key" in problems_of(dup)


def test_env_interpolation_with_default(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "rules: []\n", upstream="${UP:-http://127.0.0.1:1}")
    assert load_policy(path, {}).upstream.url == "http://127.0.0.1:1"
    assert load_policy(path, {"UP": "http://127.0.0.1:2/"}).upstream.url == "http://127.0.0.1:2"


def test_accounts_file_problems_name_that_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "rules: []\n")
    (tmp_path / "accounts.yaml").write_text(
        "accounts:\n  - id: a\n    key_sha256: nothex\n  - id: a\n    tierr: x\n")
    lines = problems_of(path)
    acc = tmp_path / "accounts.yaml"
    assert any(x.startswith(f"{acc}:3: accounts[0].key_sha256: must be the 64-hex") for x in lines)
    assert any(x.startswith(f"{acc}:4: accounts[1].id: duplicate account id") for x in lines)
    assert any(x.startswith(f"{acc}:5: accounts[1].tierr: unknown key") for x in lines)


def test_durations() -> None:
    assert parse_duration("300s") == 300
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(REPO / "policies" / "default.yaml")])
    assert ok.exit_code == 0, ok.output
    bad = write_policy(tmp_path, "rules:\n  - name: x\n    quota: lots\n")
    result = runner.invoke(main, ["check", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:9: rules[0].quota: invalid rate 'lots'" in result.output


def test_serve_refuses_invalid_policy_and_memory_with_workers(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = write_policy(tmp_path, "rules:\n  - name: x\n    quota: lots\n")
    result = runner.invoke(main, ["serve", "--policy", str(bad)])
    assert result.exit_code == 1 and "rules[0].quota" in result.output
    good = write_policy(tmp_path, "rules: []\n")
    result = runner.invoke(main, ["serve", "--policy", str(good), "--workers", "2"])
    assert result.exit_code == 2 and "memory://" in result.output


# -- every fault is a file:line problem, never an exception ------------------------------

BASE = "version: 1\naccounts: {trust_header: x-account-id}\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize(("text", "expected"), [
    (b"version: 1\nupstream: {url: 'http://a\xff'}\n", ":2: <root>: not UTF-8 text (byte 0xff"),
    (b"version: !!int abc\n", ":1: version: not a valid !!int: 'abc'"),
    (b"version: !!bool maybe\n", ":1: version: not a valid !!bool: 'maybe'"),
    (b"version: !!float x\n", ":1: version: not a valid !!float: 'x'"),
    (b"version: !!python/object:os.system {}\n",
     ":1: version: unsupported YAML tag !!python/object:os.system"),
    (b"version: !!binary aGVsbG8=\n", ":1: version: unsupported YAML tag !!binary"),
    (b"version: !custom 1\n", ":1: version: unsupported YAML tag !custom"),
    (b"version: 1\nx: &x [*x]\n", ":2: x[0]: recursive alias"),
    (b"version: 1\nupstream: &u {url: 'http://h', headers: *u}\n",
     ":2: upstream.headers: recursive alias"),
    (BOMB.encode(), ":1: <root>: aliases expand to more than 200000 values"),
    (b"version: 1\nupstream: {timeout: 1.0e+999}\n", ":2: upstream.timeout: number out of range"),
    (b"version: 1\nupstream: {timeout: .nan}\n", ":2: upstream.timeout: not a number (.nan)"),
    (b"version: 1\nupstream: {timeout: " + b"9" * 400 + b"}\n",
     ":2: upstream.timeout: number out of range"),
    (b"version: 1\nclients: {max_body_bytes: 99999999999999999999999999}\n",
     ":2: clients.max_body_bytes: number out of range"),
    (b"version: " + b"9" * 5000 + b"\n", ":1: version: number out of range"),
    (b"version: 1\nkey_prefix: 0x" + b"f" * 5000 + b"\n", ":2: key_prefix: number out of range"),
    (b"version: '\xc2\xb2'\n", ":1: version: must be an integer, got a string"),
    (b"version: 1\n1: x\n", ":2: <root>: key '1' is read as !!int by YAML: write it in quotes"),
    (b"version: 1\non: x\n", ":2: <root>: key 'on' is read as !!bool by YAML"),
    (b"version: 1\n? [a, b]\n: x\n", ":2: <root>: a key must be a plain string"),
    (b"version: 1\n\"a\\nb\": x\n", ":2: <root>: key 'a\\\\nb' contains control characters"),
    (b"version: 1\nupstream:\n  <<: 1\n", ":3: upstream: a merge key (<<) takes a mapping"),
    (b"- version: 1\n", ":1: <root>: policy must be a mapping"),
    (b"just text\n", ":1: <root>: policy must be a mapping"),
    (b"version: 1\n---\nversion: 1\n", ":2: <root>: invalid YAML: but found another document"),
    (b"a: " + b"[" * 2000 + b"]" * 2000 + b"\n", ":1: <root>: invalid YAML: nested too deeply"),
    (b"a: " + b"[" * 70 + b"]" * 70 + b"\n",
     ":1: a" + "[0]" * 63 + ": nested more than 64 levels deep"),
    (b'version: "\\U7fffffff"\n', ":1: <root>: invalid YAML: chr() arg not in range"),
    (b"version: 1\n\x00\n", ":2: <root>: invalid YAML: unacceptable character"),
    (b"", ":1: <root>: policy file is empty"),
])
def test_any_file_content_is_a_one_line_problem(tmp_path: Path, text: bytes,
                                                expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(text)
    lines = problems_of(path)
    assert any(line.startswith(str(path) + expected) for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_unreadable_files_are_problems(tmp_path: Path) -> None:
    assert problems_of(tmp_path)[0].startswith(f"{tmp_path}:0: <root>: cannot read file")
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing)[0].startswith(f"{missing}:0: <root>: cannot read file")
    long_name = tmp_path / "p.yaml"
    long_name.write_text(BASE.replace("trust_header: x-account-id", "keys: " + "k" * 5000))
    assert any(":2: accounts.keys: accounts file not found" in x for x in problems_of(long_name))


def test_anchors_aliases_and_merge_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
rules:
  - &base
    name: a
    when: &free {tier: free}
    quota: 5/minute
  - <<: *base
    name: b
    per: org
  - <<: [{name: c, quota: 1/second}, *base]
  - {name: d, budget: 100/day, when: *free}
""")
    a, b, c, d = load_policy(path, {}).rules
    assert (a.name, b.name, c.name, d.name) == ("a", "b", "c", "d")
    assert b.per == ("org",) and b.when({"tier": "free"}, {}) and not b.when({"tier": "x"}, {})
    assert [r.amount for r in c.settings.rates] == [1]   # the first merged mapping wins
    assert d.when({"tier": "free"}, {})
    # a merged key keeps the line it was written on
    path.write_text(BASE + "rules:\n  - &r {name: a, quota: lots}\n  - <<: *r\n    name: b\n")
    assert problems_of(path) == [f"{path}:4: rules[0].quota: invalid rate 'lots' (expected "
                                 "e.g. '20/minute', '500/day', '10 per second')",
                                 f"{path}:4: rules[1].quota: invalid rate 'lots' (expected "
                                 "e.g. '20/minute', '500/day', '10 per second')"]


def test_credentials_in_the_url_and_an_authorization_header_conflict(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "upstream:\n  url: http://user:s3cret@127.0.0.1:9\n"
                    "  headers: {Authorization: Bearer abc}\n")
    lines = problems_of(path)
    assert lines == [f"{path}:4: upstream.url: the URL's user:password and upstream.headers' "
                     "Authorization would both set Authorization: keep one of them"]
    # alone, either is fine; an empty Authorization (an unset key) is dropped, no conflict
    path.write_text(BASE + "upstream:\n  url: http://user:s3cret@127.0.0.1:9\n"
                    "  headers: {Authorization: 'Bearer ${KEY:-}'}\n")
    assert load_policy(path, {}).upstream.headers == ()
    # a malformed URL or state URI is echoed without its credentials
    path.write_text(BASE + "upstream: {url: 'ftp://user:s3cret@host/'}\n"
                    "state: 'mongo://:s3cret@host'\n")
    text = "\n".join(problems_of(path))
    assert "s3cret" not in text and "'ftp://***@host/'" in text and "mongo" in text


@pytest.mark.parametrize(("snippet", "expected"), [
    ("upstream: {timeout: 0}", ":3: upstream.timeout: must be a positive duration, got 0"),
    ("upstream: {timeout: -5s}", ":3: upstream.timeout: invalid duration '-5s'"),
    ("upstream: {timeout: 0ms}", ":3: upstream.timeout: must be a positive duration"),
    ("upstream: {connect_timeout: 721h}", ":3: upstream.connect_timeout: must be at most 720h"),
    ("upstream: {max_event_bytes: 0}", ":3: upstream.max_event_bytes: must be a positive size"),
    ("upstream: {max_event_bytes: 2GiB}", ":3: upstream.max_event_bytes: must be at most 1GiB"),
    ("clients: {max_body_bytes: 0}", ":3: clients.max_body_bytes: must be a positive size"),
    ("clients: {max_body_bytes: -1}", ":3: clients.max_body_bytes: invalid size -1"),
    ("rules: [{name: r, quota: 0/minute}]", ":3: rules[0].quota: rate amounts must be positive"),
    ("rules: [{name: r, budget: 0/day}]", ":3: rules[0].budget: rate amounts must be positive"),
    ("rules: [{name: r, quota: 1/minute, when: {tier: []}}]",
     ":3: rules[0].when.tier: an empty list"),
    ("rules: [{name: r, quota: 1/minute, when: {tier: }}]", ":3: rules[0].when.tier: no value"),
    ("rules: [{name: r, quota: 1/minute, when: }]", ":3: rules[0].when: no conditions"),
    ("rules: [{name: r, quota: 1/minute, when: {header: {x-team: []}}}]",
     ":3: rules[0].when.header.x-team: an empty list"),
    ("rules: [{name: r, quota: 1/minute, when: {header: {'bad name': x}}}]",
     ":3: rules[0].when.header.bad name: not a valid HTTP header name"),
    ("rules: [{name: r, quota: 1/minute, per: []}]", ":3: rules[0].per: an empty list"),
    ("rules: [{name: r, quota: 1/minute, per: 'header:a b'}]", ":3: rules[0].per: unknown per"),
    ("rules: [{name: '', quota: 1/minute}]", ":3: rules[0].name: must not be empty"),
    ("rules: [{name: r, quota: 1/minute, when: {tier: [true]}}]",
     ":3: rules[0].when.tier: must be a string or a list of strings"),
    ("upstream: {headers: {Content-Length: '5'}}",
     ":3: upstream.headers.Content-Length: set by the proxy itself"),
    ("upstream: {headers: {X-A: \"a\\nb\"}}", ":3: upstream.headers.X-A: a header value must"),
    ("upstream: {headers: {X-A: a, x-a: b}}", ":3: upstream.headers.x-a: duplicate header"),
    ("upstream: {url: 'http://h:99999'}", ":3: upstream.url: not a valid URL"),
    ("upstream: {url: 'http://h/v1?key=1'}", ":3: upstream.url: a base URL takes no ?query"),
    ("upstream: {url: 'http://'}", ":3: upstream.url: must be an http:// or https:// URL"),
    ("upstream: {cap_field: max_output}", ":3: upstream.cap_field: must be one of max_tokens, "
     "max_completion_tokens, both; got 'max_output'"),
    ("upstream: {dialect: anthropic, cap_field: both}",
     ":3: upstream.cap_field: the anthropic dialect caps output with max_tokens only"),
    ("upstream: {stream_usage: sometimes}", ":3: upstream.stream_usage: must be one of inject, "
     "never"),
    ("unguarded: [/health, docs]", ":3: unguarded[1]: a path glob must start with '/'"),
    ("unguarded: 5", ":3: unguarded: must be a string or a list of strings"),
    ("tokenizer: '.relative:count'", ":3: tokenizer: cannot load the tokenizer: TypeError"),
])
def test_out_of_range_values_are_rejected(tmp_path: Path, snippet: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + snippet + "\n")
    lines = problems_of(path)
    assert any(line.startswith(str(path) + expected) for line in lines), lines


def test_reader_positive_int(tmp_path: Path) -> None:
    from guardproxy.policy.reader import Reader
    from guardproxy.policy.source import read_yaml

    path = tmp_path / "x.yaml"
    path.write_text("a: 5\nb: 0\nc: -3\nd: '7'\ne: x\nf: 1.5\ng: 11\n")
    problems: list[Problem] = []
    r = Reader(str(path), read_yaml(path, {}, problems), "", problems)
    assert [r.positive_int(k, 9, maximum=10) for k in "abcdefgh"] == [5, 9, 9, 7, 9, 9, 9, 9]
    assert [str(p) for p in problems] == [
        f"{path}:2: b: must be an integer from 1 to 10, got 0",
        f"{path}:3: c: must be an integer from 1 to 10, got -3",
        f"{path}:5: e: must be an integer, got a string",
        f"{path}:6: f: must be an integer, got a number",
        f"{path}:7: g: must be an integer from 1 to 10, got 11",
    ]
    assert r.duration("a", 1.0) == 5.0 and r.size("a", 1) == 5


def test_new_upstream_fields_and_unguarded(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "upstream:\n  url: http://127.0.0.1:9\n  cap_field: both\n"
                    "  stream_usage: never\n  max_event_bytes: 64KiB\n"
                    "unguarded: [/health, /docs*, /openapi.json]\n")
    policy = load_policy(path, {})
    up = policy.upstream
    assert (up.cap_field, up.stream_usage, up.max_event_bytes) == ("both", "never", 65536)
    assert policy.unguarded == ("/health", "/docs*", "/openapi.json")
    path.write_text(BASE + "upstream: {url: 'http://127.0.0.1:9'}\n")
    up = load_policy(path, {}).upstream
    assert (up.cap_field, up.stream_usage, up.max_event_bytes) == (None, "inject", 4 << 20)


def test_upstream_is_optional_for_embedding(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "rules: [{name: r, quota: 5/minute}]\n")
    up = load_policy(path, {}).upstream
    assert (up.url, up.dialect, up.headers, up.timeout) == ("", "openai", (), 300.0)
    path.write_text(BASE + "upstream: {dialect: anthropic}\n")
    assert load_policy(path, {}).upstream.dialect == "anthropic"
    path.write_text(BASE + "upstream:\n")
    assert load_policy(path, {}).upstream.url == ""
    path.write_text("version: 1\n")  # accounts stay required: requests must be identified
    assert problems_of(path) == [f"{path}:1: <root>: missing required key 'accounts' "
                                 "(keys: FILE or trust_header: NAME)"]


def test_env_values_are_expanded_once(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "key_prefix: ${PREFIX}\nadmin: {token: '${T:-${X}}'}\n")
    env = {"PREFIX": "gp-${OTHER}", "OTHER": "no", "T": "t"}
    lines = problems_of(path, env)
    assert lines == [f"{path}:4: admin.token: malformed environment reference: write ${{NAME}}"
                     " or ${NAME:-default} (a default cannot hold another ${...})"]
    path.write_text(BASE + "key_prefix: ${PREFIX}\n")
    assert load_policy(path, env).key_prefix == "gp-${OTHER}"  # the value is not re-read
    path.write_text(BASE + "key_prefix: 'a-${BROKEN'\n")
    assert "malformed environment reference" in problems_of(path)[0]


def test_env_in_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "upstream:\n  url: http://127.0.0.1:9\n  headers:\n"
                    "    ${HEADER}: v\n    ${MISSING}: w\n")
    lines = problems_of(path, {"HEADER": "X-Team"})
    assert lines[0].startswith(f"{path}:7: upstream.headers: environment variable MISSING is "
                               "not set")
    path.write_text(path.read_text().replace("    ${MISSING}: w\n", ""))
    assert load_policy(path, {"HEADER": "X-Team"}).upstream.headers == (("X-Team", "v"),)


@pytest.mark.parametrize(("text", "expected"), [
    (b"accounts:\n  - id: a\n    tier: \xff\n", ":3: <root>: not UTF-8 text"),
    (b"accounts:\n  - id: !!int x\n", ":2: accounts[0].id: not a valid !!int"),
    (b"accounts: &x\n  - *x\n", ":1: accounts[0]: recursive alias"),
    (b"accounts:\n  - id: ''\n", ":2: accounts[0].id: must not be empty"),
    (b"- id: a\n", ":1: <root>: an accounts file is a mapping"),
    (b"accounts:\n  - {id: a, 1: x}\n", ":2: accounts[0]: key '1' is read as !!int"),
    (b"accounts:\n  - id: a\n    attributes: {x: " + b"9" * 30 + b"}\n",
     ":3: accounts[0].attributes.x: number out of range"),
])
def test_accounts_file_faults_are_problems(tmp_path: Path, text: bytes, expected: str) -> None:
    from guardproxy.identity.keys import read_accounts

    path = tmp_path / "accounts.yaml"
    path.write_bytes(text)
    problems: list[Problem] = []
    assert isinstance(read_accounts(path, {}, problems), dict)
    lines = [str(p) for p in problems]
    assert any(line.startswith(str(path) + expected) for line in lines), lines
