"""A budget costs exactly one Redis round trip before a request and one after it,
counted on the real Redis with MONITOR."""

from __future__ import annotations

from pathlib import Path

import httpx

from guardproxy.app import create_app
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.redis_monitor import monitored, names
from tests.servers import running_server


def test_one_round_trip_each_way(tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix

    with running_server(create_fake_app()) as fake:
        policy = write_policy(tmp_path, """
rules:
  - name: tokens
    budget: 100000/day; 1000000/month
    per: account
""", upstream=fake, state=redis_url, key_prefix=prefix)
        with running_server(create_app(policy)) as url:
            def call() -> None:
                r = httpx.post(url + "/v1/chat/completions", timeout=10,
                               json={"model": "m", "max_tokens": 5, "messages": []},
                               headers={"authorization": "Bearer key-alice"})
                assert r.status_code == 200

            call()  # warm-up: loads the Lua scripts
            with monitored(redis_url, prefix) as commands:
                call()
    assert names(commands) == ["EVALSHA", "EVALSHA"], commands  # reserve, settle
