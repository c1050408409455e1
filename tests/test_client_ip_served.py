"""The served CLI proxy decides the client address itself: uvicorn must not rewrite it
from X-Forwarded-For behind guardproxy's back (its default trusts 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests import procs
from tests.conftest import write_policy


def test_forwarded_for_from_an_untrusted_peer_cannot_dodge_an_ip_quota(
        tmp_path: Path) -> None:
    # trusted_proxies is 10.0.0.0/8 in write_policy: the loopback peer is not trusted
    policy = write_policy(tmp_path, "rules:\n  - name: per-ip\n    quota: 2/minute\n"
                                    "    per: ip\n")
    with procs.fake_model() as fake, procs.proxy(policy, upstream=fake) as url:
        statuses = [httpx.post(url + "/v1/chat/completions", timeout=10,
                               json={"model": "m", "max_tokens": 1, "messages": []},
                               headers={"authorization": "Bearer key-alice",
                                        "x-forwarded-for": f"203.0.113.{i}"}).status_code
                    for i in range(3)]
    assert statuses == [200, 200, 429], "each spoofed X-Forwarded-For counted as a new IP"
