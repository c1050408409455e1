"""``guardproxy check``: one ``FILE:LINE: field: message`` line per problem (exit 1),
``FILE:LINE: warning: …`` lines for policies that load but leave accounts unlimited
(exit 0); and the start-up checks of ``guardproxy serve``, with and without ``--demo``."""

from __future__ import annotations

import re
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from guardproxy.cli import main
from guardproxy.policy.demo import DEMO_ACCOUNTS, DEMO_POLICY
from guardproxy.policy.lint import policy_warnings
from guardproxy.policy.load import load_policy
from tests.conftest import sha
from tests.procs import free_port, process

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<rest>.+)$")


def check(*paths: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["check", *map(str, paths)], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.exit_code, result.output.splitlines()


def accounts(tmp: Path, *entries: tuple[str, str, str]) -> None:
    lines = ["accounts:"]
    for account, org, tier in entries:
        lines += [f"  - id: {account}", f"    org: {org}", f"    tier: {tier}",
                  f"    key_sha256: {sha('key-' + account)}"]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")


def policy(tmp: Path, rules: str, *, top: str = "accounts: {keys: accounts.yaml}\n",
           name: str = "p.yaml") -> Path:
    path = tmp / name
    path.write_text("version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n" + top
                    + "rules:\n" + rules)
    return path


# -- check: problems ---------------------------------------------------------------------

def test_every_problem_is_one_file_line_and_exit_1(tmp_path: Path) -> None:
    files = {
        "utf8.yaml": b"version: 1\n# caf\xe9\n",
        "tag.yaml": b"version: !!python/object:os.system {}\n",
        "int.yaml": b"version: !!int abc\n",
        "alias.yaml": b"version: 1\nx: &x [*x]\n",
        "huge.yaml": b"version: 1\nupstream: {timeout: 1.0e+999, max_event_bytes: "
                     + b"9" * 30 + b"}\n",
        "keys.yaml": b"version: 1\n1: a\n? [b]\n: c\n",
        "list.yaml": b"- version: 1\n",
        "docs.yaml": b"version: 1\n---\nversion: 1\n",
        "creds.yaml": b"version: 1\naccounts: {trust_header: x-account}\nupstream:\n"
                      b"  url: http://bob:hunter2@127.0.0.1:9\n"
                      b"  headers: {Authorization: Bearer k}\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code, lines = check(*(tmp_path / n for n in files))
    assert code == 1
    named = set()
    for line in lines:
        m = LINE.match(line)
        assert m, f"not FILE:LINE: {line!r}"
        named.add(Path(m["file"]).name)
    assert named == set(files)
    text = "\n".join(lines)
    assert "hunter2" not in text and "bob" not in text
    assert f"{tmp_path / 'creds.yaml'}:4: upstream.url: the URL's user:password and " \
           "upstream.headers' Authorization would both set Authorization" in text
    assert f"{tmp_path / 'utf8.yaml'}:2: <root>: not UTF-8 text (byte 0xe9" in text


def test_missing_and_directory_arguments(tmp_path: Path) -> None:
    code, lines = check(tmp_path / "nope.yaml", tmp_path)
    assert code == 1
    assert lines == [f"{tmp_path / 'nope.yaml'}:0: <root>: cannot read file: "
                     "No such file or directory",
                     f"{tmp_path}:0: <root>: cannot read file: Is a directory"]


def test_a_bug_is_still_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Any, env: Any = None) -> Any:
        raise RuntimeError("boom\nsecond line")

    # the module, not the "serve" command that guardproxy.cli exports under the same name
    monkeypatch.setattr(sys.modules["guardproxy.cli.serve"], "load_policy", broken)
    path = policy(tmp_path, "  []\n")
    code, lines = check(path)
    assert code == 1
    assert lines == [f"{path}:0: <root>: internal error, please report it: "
                     "RuntimeError: boom\\nsecond line"]


def test_accounts_files_are_checked_as_accounts_files(tmp_path: Path) -> None:
    accounts(tmp_path, ("alice", "acme", "free"))
    code, lines = check(tmp_path / "accounts.yaml")
    assert (code, lines) == (0, [f"{tmp_path / 'accounts.yaml'}: ok (accounts file, "
                                 "1 accounts, 1 keys)"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("accounts:\n  - id: a\n    key_sha256: nothex\n")
    code, lines = check(bad)
    assert code == 1
    assert lines[0].startswith(f"{bad}:3: accounts[0].key_sha256: must be the 64-hex")


def test_shipped_policies_check_clean() -> None:
    env = {"GUARDPROXY_CANARY_SECRET": "an-example-secret-of-32-characters"}
    files = sorted((REPO / "policies").glob("*.yaml"))
    code, lines = check(*files, env=env)
    assert code == 0, lines
    oks = [line for line in lines if ": ok (" in line]
    assert len(oks) == len(files)
    # the only warnings: the README's public demo keys, each shown once
    warnings = [line for line in lines if ": ok (" not in line]
    assert len(warnings) == 2 and all(": warning: " in w and "public demo key" in w
                                      for w in warnings), warnings


# -- check: warnings ---------------------------------------------------------------------

def test_an_unlimited_tier_is_a_warning_not_an_error(tmp_path: Path) -> None:
    accounts(tmp_path, ("alice", "acme", "free"), ("bob", "acme", "default"),
             ("carol", "other", "default"))
    path = policy(tmp_path, "  - name: free\n    when: {tier: free}\n    quota: 5/minute\n")
    code, lines = check(path)
    acc = tmp_path / "accounts.yaml"
    assert code == 0
    assert lines == [
        f"{acc}:6: warning: accounts[1].tier: no enforced quota or budget rule applies to "
        "tier 'default' ('keys add' without --tier gives tier default): accounts 'bob', "
        "'carol' have no limit at all (add a rule with when: {tier: default}, or one "
        "without 'when')",
        f"{path}: ok (1 rules, 3 keys)",
    ]


@pytest.mark.parametrize(("rules", "unlimited"), [
    ("", {"free", "default"}),
    ("  - {name: all, quota: 5/minute}\n", set()),
    ("  - {name: all, quota: 5/minute, mode: shadow}\n", {"free", "default"}),
    ("  - {name: t, budget: 500/day, when: {tier: [free, default]}}\n", set()),
    ("  - {name: t, quota: 5/minute, when: {tier: [free, pro]}}\n", {"default"}),
    ("  - {name: o, quota: 5/minute, when: {org: acme}}\n", {"default"}),  # carol: other
    ("  - {name: a, quota: 5/minute, when: {account: [bob, carol]}}\n", {"free"}),
    ("  - {name: m, quota: 5/minute, when: {model: 'gpt-4*', path: /v1/*}}\n", set()),
    ("  - {name: c, canary: {secret: 0123456789abcdef0123}}\n", {"free", "default"}),
])
def test_which_rules_cover_which_accounts(tmp_path: Path, rules: str,
                                          unlimited: set[str]) -> None:
    accounts(tmp_path, ("alice", "acme", "free"), ("bob", "acme", "default"),
             ("carol", "other", "default"))
    warnings = policy_warnings(load_policy(policy(tmp_path, rules or "  []\n"), {}))
    found = {re.search(r"to tier '(\w+)'", w.message)[1]  # type: ignore[index]
             for w in warnings}
    assert found == unlimited


def test_accounts_named_by_a_trusted_gateway(tmp_path: Path) -> None:
    top = "accounts: {trust_header: x-account-id}\n"
    path = policy(tmp_path, "  - {name: o, quota: 5/minute, when: {org: acme}}\n", top=top)
    (warning,) = policy_warnings(load_policy(path, {}))
    assert (warning.file, warning.line, warning.path) == (str(path), 3, "accounts.trust_header")
    assert "get tier 'default'" in warning.message
    path = policy(tmp_path, "  - {name: d, quota: 5/minute, when: {tier: default}}\n", top=top)
    assert policy_warnings(load_policy(path, {})) == []


def test_unguarded_model_paths_and_demo_keys_warn(tmp_path: Path) -> None:
    (tmp_path / "accounts.yaml").write_text(DEMO_ACCOUNTS.read_text())
    path = policy(tmp_path, "  - {name: all, quota: 5/minute}\n",
                  top="accounts: {keys: accounts.yaml}\nunguarded:\n  - /health\n"
                      "  - /v1/*\n")
    code, lines = check(path)
    assert code == 0
    assert f"{path}:6: warning: unguarded[1]: '/v1/*' takes in /v1/chat/completions: " \
           "model calls there skip every rule" in lines
    assert sum("accepts the public demo key 'gp-demo-" in line for line in lines) == 2


def test_warnings_of_a_shared_accounts_file_are_shown_once(tmp_path: Path) -> None:
    accounts(tmp_path, ("bob", "acme", "default"))
    a = policy(tmp_path, "  []\n", name="a.yaml")
    b = policy(tmp_path, "  []\n", name="b.yaml")
    code, lines = check(a, b)
    assert code == 0
    assert sum(": warning: " in line for line in lines) == 1


# -- serve -------------------------------------------------------------------------------

def test_serve_needs_an_upstream_url(tmp_path: Path) -> None:
    accounts(tmp_path, ("bob", "acme", "default"))
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nupstream:\n  dialect: openai\naccounts: {keys: accounts.yaml}\n")
    result = CliRunner().invoke(main, ["serve", "--policy", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{tmp_path / 'accounts.yaml'}:2: warning: accounts[0].tier: no enforced quota or "
        "budget rule applies to tier 'default' ('keys add' without --tier gives tier "
        "default): account 'bob' has no limit at all (add a rule with when: "
        "{tier: default}, or one without 'when')",
        f"{path}:2: upstream.url: required to serve (or pass --upstream)",
    ]
    path.write_text("version: 1\naccounts: {keys: accounts.yaml}\nrules: []\n")
    result = CliRunner().invoke(main, ["serve", "--policy", str(path)])
    assert result.output.splitlines()[-1] == \
        f"{path}:1: upstream.url: required to serve (or pass --upstream)"


@pytest.mark.parametrize(("args", "message"), [
    (["--demo", "--upstream", "http://127.0.0.1:9"], "--demo forwards to the fake model"),
    ([], "give --policy FILE (or set GUARDPROXY_POLICY), or --demo"),
    (["--policy", "x.yaml", "--upstream", "ftp://bob:hunter2@h"],
     "Invalid value for --upstream: must be an http:// or https:// URL, got 'ftp://***@h'"),
])
def test_serve_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args], env={"GUARDPROXY_POLICY": ""})
    assert result.exit_code == 2
    assert message in result.output and "hunter2" not in result.output


def test_serve_upstream_credentials_conflict_with_the_policy_header(tmp_path: Path) -> None:
    accounts(tmp_path, ("bob", "acme", "default"))
    path = policy(tmp_path, "  - {name: all, quota: 5/minute}\n")
    path.write_text(path.read_text().replace("'http://127.0.0.1:9'",
                                             "'http://127.0.0.1:9', headers: {Authorization: k}"))
    result = CliRunner().invoke(main, ["serve", "--policy", str(path),
                                       "--upstream", "http://bob:hunter2@127.0.0.1:9"])
    assert result.exit_code == 2 and "hunter2" not in result.output
    assert "would both set Authorization" in result.output


def test_serve_start_line_hides_credentials(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from guardproxy.app import POLICY_ENV

    monkeypatch.setenv(POLICY_ENV, "")  # serve sets it; restored after the test
    ran: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: ran.append(kw))
    accounts(tmp_path, ("bob", "acme", "default"))
    path = policy(tmp_path, "  - {name: all, quota: 5/minute}\n",
                  top="accounts: {keys: accounts.yaml}\nstate: 'redis://:hunter2@127.0.0.1:1/0'\n")
    path.write_text(path.read_text().replace("http://127.0.0.1:9", "http://bob:hunter2@h:9"))
    result = CliRunner().invoke(main, ["serve", "--policy", str(path)])
    assert result.exit_code == 0 and ran, result.output
    assert "hunter2" not in result.output
    assert "-> http://***@h:9 (openai, 1 rules, state redis://***@127.0.0.1:1/0)" \
        in result.output


def test_demo_policy_ships_in_the_package_and_is_clean() -> None:
    policy = load_policy(DEMO_POLICY, {})
    assert policy.upstream.url == "" and policy.state == "memory://"
    assert {a.id for a in policy.keys.values()} == {"demo-free", "demo-pro"}
    assert policy_warnings(policy) == []
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["guardproxy"]
    for data in (DEMO_POLICY, DEMO_ACCOUNTS):
        inside = data.relative_to(REPO / "guardproxy").as_posix()
        assert any(fnmatch(inside, glob) for glob in globs), f"{inside} not in package-data"


def test_docker_image_bakes_in_no_keys() -> None:
    copies = [line for line in (REPO / "Dockerfile").read_text().splitlines()
              if line.startswith(("COPY", "ADD"))]
    assert copies and not any("policies" in line or "accounts" in line for line in copies)


@pytest.mark.parametrize("args", [["--demo"], ["--policy", "policies/default.yaml", "--demo"]],
                         ids=["built-in", "readme-quick-start"])
def test_serve_demo_answers_with_the_demo_keys(args: list[str]) -> None:
    port = free_port()
    # empty: no GUARDPROXY_POLICY from the environment; relative paths from the repo root
    with process(["serve", *args, "--port", str(port), "--log-level", "warning"], port,
                 env={"GUARDPROXY_POLICY": ""}) as url:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
        ok = httpx.post(url + "/v1/chat/completions", json=body,
                        headers={"authorization": "Bearer gp-demo-free"}, timeout=10)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"]
        denied = httpx.post(url + "/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer gp-not-a-key"}, timeout=10)
        assert denied.status_code == 401
