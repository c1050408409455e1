from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from guardproxy.cli import main
from guardproxy.errors import PolicyError
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
