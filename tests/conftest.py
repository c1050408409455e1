"""Shared fixtures: a real Redis (own key prefix, cleaned up), policy files in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_URL = os.environ.get("GUARDPROXY_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> Iterator[tuple[str, str]]:
    """(redis URL, unique key prefix). Fails loudly under CI=true when Redis is absent."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required in CI but {REDIS_URL} is unreachable: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"gptest-{uuid.uuid4().hex[:12]}"
    yield REDIS_URL, prefix
    keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ACCOUNTS = {
    "key-alice": ("alice", "acme", "free"),
    "key-bob": ("bob", "acme", "pro"),
    "key-carol": ("carol", "other", "free"),
}


def write_policy(tmp: Path, body: str, *, upstream: str = "http://127.0.0.1:9",
                 dialect: str = "openai", state: str = "memory://",
                 key_prefix: str = "guardproxy") -> Path:
    """A policy file (and its accounts file) for tests; ``body`` is the rules section."""
    lines = ["accounts:"]
    for key, (account, org, tier) in ACCOUNTS.items():
        lines += [f"  - id: {account}", f"    org: {org}", f"    tier: {tier}",
                  f"    key_sha256: {sha(key)}"]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"version: 1\n"
        f"upstream: {{url: '{upstream}', dialect: {dialect}, timeout: 5s, connect_timeout: 2s}}\n"
        f"state: '{state}'\n"
        f"key_prefix: {key_prefix}\n"
        f"accounts: {{keys: accounts.yaml}}\n"
        f"clients: {{trusted_proxies: [10.0.0.0/8]}}\n" + body
    )
    return policy
