from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardproxy.cli import main
from guardproxy.dialects import get_dialect
from guardproxy.errors import AuthenticationError
from guardproxy.identity import Identifier
from guardproxy.identity.client_ip import client_ip
from guardproxy.identity.keys import hash_key
from guardproxy.policy.load import load_policy
from tests.conftest import write_policy

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def test_forwarded_for_only_from_trusted_peers() -> None:
    xff = {"x-forwarded-for": "203.0.113.9, 10.1.1.1"}
    assert client_ip("10.0.0.5", xff, TRUSTED) == "203.0.113.9"
    assert client_ip("198.51.100.7", xff, TRUSTED) == "198.51.100.7"
    assert client_ip("10.0.0.5", {}, TRUSTED) == "10.0.0.5"
    # a spoofed left-most entry does not win over the first untrusted hop
    spoof = {"x-forwarded-for": "1.2.3.4, 203.0.113.9"}
    assert client_ip("10.0.0.5", spoof, TRUSTED) == "203.0.113.9"


@pytest.mark.parametrize(("dialect", "headers"), [
    ("openai", {"authorization": "Bearer key-alice"}),
    ("anthropic", {"x-api-key": "key-alice"}),
])
def test_key_to_account(tmp_path: Path, dialect: str, headers: dict[str, str]) -> None:
    policy = load_policy(write_policy(tmp_path, "rules: []\n", dialect=dialect), {})
    ident = Identifier(policy, get_dialect(dialect))
    account = ident.account("127.0.0.1", headers)
    assert (account.id, account.org, account.tier) == ("alice", "acme", "free")
    with pytest.raises(AuthenticationError):
        ident.account("127.0.0.1", {})
    with pytest.raises(AuthenticationError):
        ident.account("127.0.0.1", {"authorization": "Bearer wrong", "x-api-key": "wrong"})


def test_trust_header_only_from_trusted_proxy(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "rules: []\n")
    path.write_text(path.read_text().replace("accounts: {keys: accounts.yaml}",
                                             "accounts: {keys: accounts.yaml, "
                                             "trust_header: X-Account-Id}"))
    policy = load_policy(path, {})
    ident = Identifier(policy, get_dialect("openai"))
    assert ident.account("10.2.3.4", {"x-account-id": "bob"}).tier == "pro"
    assert ident.account("10.2.3.4", {"x-account-id": "zed"}).id == "zed"
    with pytest.raises(AuthenticationError):
        ident.account("192.0.2.1", {"x-account-id": "bob"})


def test_keys_add_prints_key_once_and_stores_only_hash(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.yaml"
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "add", "dave", "--org", "acme", "--tier", "pro",
                                  "--file", str(accounts)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    text = accounts.read_text()
    assert key not in text and hash_key(key) in text
    second = runner.invoke(main, ["keys", "add", "dave", "--file", str(accounts)])
    key2 = second.stdout.strip().splitlines()[0]
    policy_path = tmp_path / "p.yaml"
    policy_path.write_text("version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n"
                           "accounts: {keys: accounts.yaml}\n")
    policy = load_policy(policy_path, {})
    assert policy.keys[hash_key(key)].id == policy.keys[hash_key(key2)].id == "dave"
    assert policy.keys[hash_key(key)].tier == "pro"
