"""Quotas, budgets and the canary ledger on Redis Cluster and Sentinel, as on one Redis:
two proxies share each deployment and enforce one quota and one budget between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from guardproxy import GuardMiddleware
from guardproxy.admin import usage_report
from guardproxy.canary.ledger import RedisLedger
from guardproxy.guards.canary import CanaryGuard
from tests.conftest import write_policy
from tests.redis_topologies import redis_cluster, redis_sentinel
from tests.test_budget import usage_app

ANSWER = ("It is often simple to choose a large plan and then gradually improve it, "
          "which usually helps more than trying to build everything at once.")


async def chat_app(scope: dict[str, object], receive: Callable[[], object],
                   send: Callable[[dict[str, object]], object]) -> None:
    """A chat completion with text and usage (10 prompt + 50 completion tokens)."""
    await usage_app(scope, receive, _swap_body(send))  # type: ignore[arg-type]


def _swap_body(send: Callable[[dict[str, object]], object]) -> Callable[..., object]:
    import json

    async def wrapped(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            body = json.dumps({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": ANSWER},
                 "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 50}}).encode()
            message = {**message, "body": body}
        elif message["type"] == "http.response.start":
            message = {**message, "headers": [(b"content-type", b"application/json")]}
        await send(message)  # type: ignore[misc]

    return wrapped

RULES = """
rules:
  - name: requests
    quota: 3/minute
  - name: tokens
    budget: 1000/day
    default_max_tokens: 100
  - name: marks
    canary: {secret: topology-secret-0123456789}
"""

Topology = Callable[[Path], AbstractContextManager[str]]


@pytest.fixture(params=[redis_cluster, redis_sentinel], ids=["cluster", "sentinel"])
def state_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    topology: Topology = request.param
    with topology(tmp_path) as uri:
        yield uri


async def test_two_proxies_share_quota_budget_and_ledger(tmp_path: Path,
                                                         state_uri: str) -> None:
    policy = write_policy(tmp_path, RULES, state=state_uri, key_prefix="gptopo")
    apps = [GuardMiddleware(chat_app, policy) for _ in range(2)]
    statuses = []
    for i in range(4):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[i % 2]),
                                     base_url="http://proxy") as c:
            r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []},
                             headers={"authorization": "Bearer key-alice"})
            statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 429], "one quota across both proxies"
    report = await usage_report(apps[0].pipeline, "alice")
    assert report is not None
    (window,) = report["budgets"][0]["windows"]
    # each answered request reported 10 prompt + 50 completion tokens
    assert (window["used"], window["reserved"]) == (3 * 60, 0)
    (canary,) = [g for g in apps[1].pipeline.guards if isinstance(g, CanaryGuard)]
    assert isinstance(canary.ledger, RedisLedger)
    entries = [e async for e in canary.ledger.entries()]
    assert [e.account for e in entries] == ["alice"] * 3, "both proxies wrote one ledger"
    for app in apps:
        await app.state.aclose()
