"""Two real proxy processes on the real Redis enforce one shared quota."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import write_policy
from tests.procs import fake_model, proxy


def test_two_processes_share_one_quota(tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix
    policy = write_policy(tmp_path, """
rules:
  - name: shared
    quota: 10/minute
    per: account
    # a fixed window opens at the first hit; the sliding counter's windows are aligned
    # to the minute, and a run across a boundary would rightly let one more through
    strategy: fixed-window
""", state=redis_url, key_prefix=prefix)
    with fake_model() as upstream, proxy(policy, upstream) as a, proxy(policy, upstream) as b:
        codes = []
        for i in range(16):
            r = httpx.post((a, b)[i % 2] + "/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                           headers={"authorization": "Bearer key-alice"}, timeout=10)
            codes.append(r.status_code)
        other = httpx.post(b + "/v1/chat/completions", json={"model": "m", "messages": []},
                           headers={"authorization": "Bearer key-carol"}, timeout=10)
    assert codes.count(200) == 10, codes
    assert codes.count(429) == 6
    assert codes[:10] == [200] * 10
    assert other.status_code == 200


def test_unreachable_redis_is_a_503_not_a_crash(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, """
rules:
  - name: strict
    quota: 10/minute
  - name: lenient
    quota: 10/minute
    per: org
    on_store_error: allow
""", state="redis://127.0.0.1:1/0")
    with fake_model() as upstream, proxy(policy, upstream) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": []},
                       headers={"authorization": "Bearer key-alice"}, timeout=10)
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "server_error"
