"""Quotas are checked, then committed only once every guard allowed the request: a
request denied by any window of any rule consumes nothing anywhere. Shadow rules never
deny and never show in headers; every denial, enforced or shadow, is one JSON log line."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from guardproxy import GuardMiddleware
from tests.test_request_plan import Upstream, call, chat, json_headers, policy, window


async def left(app: GuardMiddleware, rule: str, key: str = "account=alice") -> list[int]:
    """What is left in each window of quota ``rule`` for counter ``key``."""
    guard: Any = next(g for g in app.pipeline.guards if g.rule.name == rule)
    return list((await guard.store.quota_state(guard.ask(key))).remaining)


async def ask(app: GuardMiddleware, **fields: Any) -> Any:
    return await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                      body=chat(**fields))


async def test_denied_by_one_window_consumes_no_other_window(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, """
rules:
  - name: both
    quota: 1/minute; 100/day
"""))
    statuses = [(await ask(app)).status for _ in range(4)]
    assert statuses == [200, 429, 429, 429]
    assert await left(app, "both") == [0, 99]


async def test_denied_by_a_later_rule_consumes_no_earlier_rule(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, """
rules:
  - name: a-wide
    quota: 10/minute
  - name: b-narrow
    quota: 1/minute
"""))
    first, second, third = [await ask(app) for _ in range(3)]
    assert (first.status, second.status, third.status) == (200, 429, 429)
    assert "b-narrow" in second.json()["error"]["message"]
    assert await left(app, "a-wide") == [9]
    assert await left(app, "b-narrow") == [0]


async def test_denied_by_an_earlier_rule_never_reaches_a_later_one(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, """
rules:
  - name: a-narrow
    quota: 1/minute
  - name: b-wide
    quota: 10/minute
"""))
    assert [(await ask(app)).status for _ in range(3)] == [200, 429, 429]
    assert await left(app, "b-wide") == [9]


async def test_denied_by_a_budget_consumes_no_quota(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: requests
    quota: 10/minute
  - name: tokens
    budget: 1000/day
"""))
    denied = await ask(app, max_tokens=5000)
    assert denied.status == 429 and denied.json()["error"]["code"] == "insufficient_quota"
    assert await left(app, "requests") == [10]
    ok = await ask(app, max_tokens=100)
    assert ok.status == 200
    assert ok.header("x-ratelimit-remaining-requests") == ["9"]
    assert len(up.seen) == 1


async def test_a_quota_commit_that_fills_up_releases_the_budget(tmp_path: Path) -> None:
    """Concurrent requests all pass the check of a 2/minute quota; the commits admit
    exactly two, and the others give their budget reservations back."""
    up = Upstream(delay=0.02)
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: requests
    quota: 2/minute
  - name: tokens
    budget: 100000/day
"""))
    replies = await asyncio.gather(*[ask(app, max_tokens=100) for _ in range(8)])
    assert sorted(r.status for r in replies) == [200] * 2 + [429] * 6
    assert len(up.seen) == 2
    state = await window(app)
    assert state.reserved == 0 and state.used == 2 * (10 + 100)
    assert await left(app, "requests") == [0]


async def test_concurrent_commits_on_redis_admit_exactly_the_limit(
        tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: a-wide
    quota: 100/minute
  - name: b-narrow
    quota: 3/minute
""", state=url, key_prefix=prefix))
    try:
        replies = await asyncio.gather(*[ask(app) for _ in range(10)])
        assert sorted(r.status for r in replies) == [200] * 3 + [429] * 7
        assert len(up.seen) == 3
        assert await left(app, "b-narrow") == [0]
    finally:
        await app.state.aclose()


# -- shadow rules ----------------------------------------------------------------------


async def test_shadow_rules_never_deny_and_never_show(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: watch-requests
    quota: 1/minute
    mode: shadow
  - name: watch-tokens
    budget: 50/day
    mode: shadow
  - name: requests
    quota: 5/minute
"""))
    replies = [await ask(app, max_tokens=100) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.header("x-ratelimit-remaining-requests") for r in replies] == [["4"], ["3"], ["2"]]
    assert all(r.header("x-ratelimit-limit-requests") == ["5"] for r in replies)
    assert all(r.header("x-ratelimit-limit-tokens") == [] for r in replies)
    assert [s.json["max_tokens"] for s in up.seen] == [100] * 3, "a shadow budget rewrites nothing"


async def test_one_log_line_per_denial_and_per_shadow_denial(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, """
rules:
  - name: watch
    quota: 1/minute
    mode: shadow
  - name: watch-tokens
    budget: 50/day
    mode: shadow
  - name: enforce
    quota: 2/minute
"""))
    caplog.set_level(logging.INFO, logger="guardproxy.decisions")
    replies = [await ask(app, max_tokens=100) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429]
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "guardproxy.decisions"]
    ids = [r.header("x-request-id")[0] for r in replies]
    expected = [
        ("shadow_deny", "watch-tokens", ids[0]),
        ("shadow_deny", "watch", ids[1]), ("shadow_deny", "watch-tokens", ids[1]),
        ("shadow_deny", "watch", ids[2]), ("deny", "enforce", ids[2]),
    ]
    assert sorted((x["event"], x["rule"], x["request_id"]) for x in lines) == sorted(expected)
    for line in lines:
        assert line["account"] == "alice" and line["status"] == 429 and line["window"]
    assert all(r.levelno == logging.INFO for r in caplog.records
               if r.name == "guardproxy.decisions")
