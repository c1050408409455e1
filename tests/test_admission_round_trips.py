"""Round trips to Redis per request (issue 12), counted with MONITOR through a real
uvicorn server: the shipped default policy's rules plus account linkage and a canary
rule make one admission call before the upstream and one settle after it; the canary
ledger adds its own write (where the policy keeps its ledger on Redis)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from guardproxy.app import create_app
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.redis_monitor import monitored, names
from tests.servers import running_server

ROOT = Path(__file__).resolve().parent.parent
LINKAGE = """
linkage:
  secret: round-trip-secret-0123456789
  window: 30d
  signals:
    - {ip: /24, weight: 0.5, max_fanout: 20}
    - {header: x-device-id, weight: 0.6, max_fanout: 5}
"""


def default_rules(*extra: dict[str, object]) -> str:
    rules = yaml.safe_load((ROOT / "policies/default.yaml").read_text())["rules"]
    return yaml.safe_dump({"rules": [*rules, *extra]}, sort_keys=False)


@pytest.mark.parametrize(("canary", "expected"), [
    ("", ["EVALSHA", "EVALSHA"]),   # admission, settle
    ("file", ["EVALSHA", "EVALSHA"]),
    ("redis", ["EVALSHA", "EVALSHA", "EVALSHA"]),   # + the ledger's entry
], ids=["default+linkage", "+canary-file-ledger", "+canary-redis-ledger"])
def test_default_policy_with_linkage_makes_two_round_trips(
        tmp_path: Path, redis_prefix: tuple[str, str], canary: str,
        expected: list[str]) -> None:
    url, prefix = redis_prefix
    extra = []
    if canary:
        ledger = {"store": "state"} if canary == "redis" else \
            {"store": "file", "path": str(tmp_path / "ledger.jsonl")}
        extra.append({"name": "marks", "canary": {
            "secret": "round-trip-canary-0123456789", "ledger": ledger}})
    rules = default_rules(*extra)
    with running_server(create_fake_app()) as fake:
        policy = write_policy(tmp_path, LINKAGE + rules, upstream=fake, state=url,
                              key_prefix=prefix)

        with running_server(create_app(policy)) as proxy:
            def call(stream: bool) -> None:
                r = httpx.post(proxy + "/v1/chat/completions", timeout=10, json={
                    "model": "m", "max_tokens": 20, "stream": stream,
                    "messages": [{"role": "user", "content": "Say something long."}]},
                    headers={"authorization": "Bearer key-alice", "x-device-id": "d-1"})
                assert r.status_code == 200, r.text

            call(False)  # warm-up: loads the Lua scripts
            for stream in (False, True):
                with monitored(url, prefix) as commands:
                    call(stream)
                assert names(commands) == expected, commands
