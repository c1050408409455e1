"""A stream longer than the budget's lease TTL keeps its reservation: the lease is
renewed while the response runs, so a concurrent request cannot spend what the stream
may still generate, and the stream is charged its usage once it ends. Against a real
uvicorn server; the waits are for chunks, never timed assertions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from guardproxy import GuardMiddleware
from guardproxy.state import open_state
from guardproxy.state.budgets import WindowState
from guardproxy.tokens import estimate_prompt
from tests.servers import running_server
from tests.test_middleware_edges import STREAM_REQUEST, StreamingUpstream
from tests.test_request_plan import OPENAI_KEY, PROMPT_TOKENS, policy, window

LEASED = """
rules:
  - name: tokens
    budget: 1000/day
    lease_ttl: 1s
"""


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_long_stream_keeps_its_reservation(tmp_path: Path, store: str,
                                                   request: pytest.FixtureRequest) -> None:
    state_uri, prefix = "memory://", "guardproxy"
    if store == "redis":
        state_uri, prefix = request.getfixturevalue("redis_prefix")
    # 7 chunks 0.5 s apart: 3.5 s, three and a half lease TTLs
    up = StreamingUpstream(chunks=7, delay=0.5, completion_tokens=14)
    app = GuardMiddleware(up, policy(tmp_path, LEASED, state=state_uri, key_prefix=prefix))
    # the server runs on its own loop; Redis clients belong to one loop, so read with ours
    reader = app.state if store == "memory" else open_state(state_uri, prefix)
    windows = app.pipeline.guards[0].rule.settings.windows

    async def budget() -> WindowState:
        return (await reader.budgets.usage("tokens|account=alice", windows))[0]

    body = {**STREAM_REQUEST, "max_tokens": 600}
    reserved = estimate_prompt(body) + 600
    try:
        with running_server(app, lifespan="off") as url:
            async with httpx.AsyncClient(base_url=url, timeout=20) as c, \
                    c.stream("POST", "/v1/chat/completions", json=body,
                             headers=OPENAI_KEY) as first:
                assert first.status_code == 200
                received = 0
                mid: list[tuple[int, int, int]] = []
                async for part in first.aiter_raw():
                    received += part.count(b'"content"')
                    if received >= 5 and not mid:  # 2 s in: two TTLs have passed
                        state = await budget()
                        second = await c.post("/v1/chat/completions", headers=OPENAI_KEY,
                                              json={**body, "stream": False})
                        mid.append((state.reserved, state.used, second.status_code))
            assert received == 7
            (held, used, status) = mid[0]
            assert (held, used) == (reserved, 0), "the stream's reservation is still held"
            assert status == 429, "a concurrent request cannot take what the stream holds"
            for _ in range(500):  # the server settles after the last byte left: wait
                final = await budget()
                if final.reserved == 0:
                    break
                await asyncio.sleep(0.02)
            assert (final.used, final.reserved) == (PROMPT_TOKENS + 14, 0)
            assert len(up.seen) == 1
    finally:
        if store == "redis":
            await reader.aclose()


async def test_without_renewal_the_lease_would_lapse(tmp_path: Path) -> None:
    """The control: the same reservation, not renewed (no response running), is
    reclaimed after the TTL — so the test above can tell renewal from no renewal."""
    app = GuardMiddleware(StreamingUpstream(), policy(tmp_path, LEASED))
    guard = app.pipeline.guards[0]
    store = app.pipeline.state.budgets
    settings = guard.rule.settings
    held = await store.reserve("tokens|account=alice", settings.windows, 613, 1.0)
    assert held.ok
    await asyncio.sleep(1.2)
    assert (await window(app)).reserved == 0
