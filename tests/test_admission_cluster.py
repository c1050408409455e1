"""Batched admission on Redis Cluster (issue 12): a request's keys fall in several slots,
so admission is one script per slot, sent concurrently. Budgets stay exact: two proxies
on one private cluster, concurrent requests that all reserve before any settles, admit
exactly what the budget holds; what the slots that allowed a request denied elsewhere
counted is given back; and the same sequence of requests gets the same answers and
leaves the same usage on the cluster as on one Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy import GuardMiddleware
from guardproxy.admin import usage_report
from guardproxy.tokens import estimate_prompt, estimate_text
from tests.conftest import write_policy
from tests.redis_topologies import redis_cluster

# a per-account quota, a per-account budget and a per-org budget: three hash slots
RULES = """
rules:
  - name: requests
    quota: 1000/minute
    per: account
  - name: mine
    budget: 100000/day
    per: account
    default_max_tokens: 100
  - name: org-tokens
    budget: 1000/day
    per: org
    default_max_tokens: 100
"""


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def slow_app(delay: float) -> Any:
    """Answers after ``delay`` seconds with usage: 10 prompt + 50 completion tokens."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(delay)
        out = json.dumps({"object": "chat.completion", "choices": [],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 50}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})
    return app


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as uri:
        yield uri


async def post(app: GuardMiddleware, key: str = "key-alice") -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://proxy") as c:
        r = await c.post("/v1/chat/completions",
                         json=BODY,
                         headers={"authorization": f"Bearer {key}"})
        return r.status_code


async def windows(app: GuardMiddleware, account: str) -> dict[str, Any]:
    report = await usage_report(app.pipeline, account)
    assert report is not None
    return {b["rule"]: [(w["used"], w["reserved"]) for w in b["windows"]]
            for b in report["budgets"]}


async def quota_left(app: GuardMiddleware, account: str) -> int:
    guard: Any = next(g for g in app.pipeline.guards if g.rule.name == "requests")
    return int((await guard.store.quota_state(guard.ask(f"account={account}"))).remaining[0])


async def test_concurrent_requests_admit_exactly_what_the_budget_holds(
        tmp_path: Path, cluster: str) -> None:
    policy = write_policy(tmp_path, RULES, state=cluster, key_prefix="gpadmit1")
    apps = [GuardMiddleware(slow_app(0.6), policy) for _ in range(2)]
    try:
        # alice and bob share org acme: each request reserves ~110 of the org's 1000, and
        # all reserve before any settles (the upstream answers after 0.6 s)
        statuses = await asyncio.gather(*(post(apps[i % 2], ("key-alice", "key-bob")[i % 2])
                                          for i in range(24)))
        reserve = estimate_prompt(BODY, estimate_text) + 100   # each request's reservation
        fits = 1000 // reserve
        assert statuses.count(200) == fits, (statuses, reserve)
        assert set(statuses) == {200, 429}
        alice, bob = await windows(apps[0], "alice"), await windows(apps[1], "bob")
        admitted_alice = [s for i, s in enumerate(statuses) if i % 2 == 0].count(200)
        admitted_bob = fits - admitted_alice
        assert alice["org-tokens"] == [(fits * 60, 0)], "exact: answers of 60 tokens each"
        assert alice["mine"] == [(admitted_alice * 60, 0)], "denied: released elsewhere"
        assert bob["mine"] == [(admitted_bob * 60, 0)]
        # the quota slot counted the denied requests, then gave them back
        assert await quota_left(apps[0], "alice") == 1000 - admitted_alice
        assert await quota_left(apps[1], "bob") == 1000 - admitted_bob
    finally:
        for app in apps:
            await app.state.aclose()


async def test_the_same_requests_get_the_same_answers_as_on_one_redis(
        tmp_path: Path, cluster: str, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    answers = []
    for state, key_prefix, folder in ((cluster, "gpadmit2", "c"), (url, prefix, "r")):
        (tmp_path / folder).mkdir()
        app = GuardMiddleware(slow_app(0.0), write_policy(
            tmp_path / folder, RULES, state=state, key_prefix=key_prefix))
        try:
            statuses = [await post(app, ("key-alice", "key-bob", "key-carol")[i % 3])
                        for i in range(30)]
            usage = {who: await windows(app, who) for who in ("alice", "bob", "carol")}
            answers.append((statuses, usage, [await quota_left(app, who)
                                              for who in ("alice", "bob", "carol")]))
        finally:
            await app.state.aclose()
    assert answers[0] == answers[1]
    statuses = answers[0][0]
    assert statuses.count(429) > 0 and statuses.count(200) > 0
