"""Budgets under real concurrency: the proof that reservations hold.

200 concurrent requests (mixed streaming and not, random max_tokens) against one
account's budget, through 4 real proxy processes on the real Redis, and through one
in-process proxy on memory://.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx

from guardproxy.state.budgets import Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.redis_client import redis_from_uri
from guardproxy.tokens import estimate_prompt
from tests.conftest import write_policy
from tests.procs import fake_model, proxy

CAP = 6000
RULES = f"""
rules:
  - name: tokens
    budget: {CAP}/day
    per: account
"""


def request_body(rng: random.Random, i: int) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "m", "max_tokens": rng.randint(5, 60),
        "messages": [{"role": "user", "content": f"question number {i} please"}],
    }
    if rng.random() < 0.5:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def one(client: httpx.AsyncClient, url: str, body: dict[str, object]
              ) -> tuple[int, int, dict[str, object]]:
    """(status, tokens charged as the API reported them, body)."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer key-alice"}) as r:
        raw = await r.aread()
    if r.status_code != 200:
        return r.status_code, 0, body
    if not body.get("stream"):
        usage = json.loads(raw)["usage"]
        return 200, usage["prompt_tokens"] + usage["completion_tokens"], body
    for line in raw.decode().splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return 200, usage["prompt_tokens"] + usage["completion_tokens"], body
    raise AssertionError("stream without usage")


def need(body: dict[str, object]) -> int:
    return estimate_prompt(body) + int(body["max_tokens"])  # type: ignore[call-overload]


async def burst(urls: list[str], n: int = 200) -> list[tuple[int, int, dict[str, object]]]:
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(one(client, urls[i % len(urls)], request_body(rng, i))
                                      for i in range(n)))


def check_accounting(results: list[tuple[int, int, dict[str, object]]], used: int,
                     reserved: int) -> None:
    charged = sum(tokens for status, tokens, _ in results if status == 200)
    denied = [body for status, _, body in results if status == 429]
    assert {status for status, _, _ in results} <= {200, 429}
    assert reserved == 0, "leaked reservations"
    assert used == charged, "remaining must be cap - sum of actual usage, exactly"
    assert charged <= CAP + max(need(b) for _, _, b in results)
    assert denied, "the burst is sized to exhaust the budget"
    # No phantom denials: at any moment used + reserved is at most the sum of what the
    # granted requests reserved, so a refusal is only legitimate when even that sum
    # leaves too little. A leaked reservation would break this.
    granted = sum(need(b) for status, _, b in results if status == 200)
    for body in denied:
        assert granted + need(body) > CAP, f"denied although the budget could hold {body}"


@contextlib.contextmanager
def proxies(policy: Path, upstream: str, n: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(proxy(policy, upstream)) for _ in range(n)]


def test_four_processes_on_redis(tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix
    policy = write_policy(tmp_path, RULES, state=redis_url, key_prefix=prefix)
    with fake_model() as upstream, proxies(policy, upstream, 4) as urls:
        results = asyncio.run(burst(urls))

        async def state() -> tuple[int, int]:
            store = RedisBudgetStore(redis_from_uri(redis_url), prefix)
            try:
                (day,) = await store.usage("tokens|account=alice", (Window(CAP, 86400),))
            finally:
                await store.aclose()
            return day.used, day.reserved

        used, reserved = asyncio.run(state())
        check_accounting(results, used, reserved)
        # and what is left can still be spent
        left = CAP - used
        small = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
        if left >= need(small):
            r = httpx.post(urls[0] + "/v1/chat/completions", json=small, timeout=10,
                           headers={"authorization": "Bearer key-alice"})
            assert r.status_code == 200


def test_one_process_on_memory(tmp_path: Path) -> None:
    from guardproxy.app import create_app
    from tests.servers import running_server

    with fake_model() as upstream:
        policy = write_policy(tmp_path, RULES, upstream=upstream)
        app = create_app(policy)
        with running_server(app) as url:
            results = asyncio.run(burst([url]))

        async def state() -> tuple[int, int]:
            (day,) = await app.guarded.pipeline.state.budgets.usage(
                "tokens|account=alice", (Window(CAP, 86400),))
            return day.used, day.reserved

        used, reserved = asyncio.run(state())
    check_accounting(results, used, reserved)
