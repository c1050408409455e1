"""Leases outlive the streams they cover (renew), and on Redis every deadline and window
comes from the store's one clock, whatever the replicas' clocks say."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from guardproxy.state.budgets import BudgetStore, MemoryBudgetStore, Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.redis_client import redis_from_uri

DAY = Window(limit=1000, seconds=86400)
HOUR = Window(limit=500, seconds=3600)


@dataclass
class Clocked:
    store: BudgetStore
    wait: Callable[[float], Awaitable[None]]   # let this much store time pass


@pytest.fixture(params=["memory", "redis"])
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[Clocked]:
    if request.param == "memory":
        now = [1_700_000_000.0]

        async def advance(seconds: float) -> None:
            now[0] += seconds

        yield Clocked(MemoryBudgetStore(clock=lambda: now[0]), advance)
        return
    url, prefix = request.getfixturevalue("redis_prefix")
    store = RedisBudgetStore(redis_from_uri(url), prefix)
    yield Clocked(store, asyncio.sleep)   # Redis reads its own clock: real time passes
    await store.aclose()


async def test_renewed_lease_is_never_reclaimed_and_unrenewed_one_is(
        clocked: Clocked) -> None:
    store = clocked.store
    kept = await store.reserve("streaming", (DAY,), 900, ttl=1)
    lost = await store.reserve("stalled", (DAY,), 900, ttl=1)
    assert kept.lease_id and lost.lease_id
    for _ in range(10):                       # renewed every 0.3 s for 3 s
        await clocked.wait(0.3)
        assert await store.renew("streaming", kept.lease_id, ttl=1)
    # another reservation on the same subject still sees the renewed lease...
    refused = await store.reserve("streaming", (DAY,), 200, ttl=60)
    assert not refused.ok and refused.remaining == [100]
    # ...and reclaims the one that was not renewed
    assert (await store.reserve("stalled", (DAY,), 200, ttl=60)).ok
    assert not await store.renew("stalled", lost.lease_id, ttl=1)  # too late
    (day,) = await store.usage("streaming", (DAY,))
    assert (day.used, day.reserved) == (0, 900)
    # the renewed lease settles normally; then it cannot be renewed any more
    assert await store.settle("streaming", kept.lease_id, 700)
    assert not await store.renew("streaming", kept.lease_id, ttl=1)
    assert not await store.renew("streaming", "no-such-lease", ttl=1)
    (day,) = await store.usage("streaming", (DAY,))
    assert (day.used, day.reserved) == (700, 0)


async def test_renew_never_shortens_a_lease(clocked: Clocked) -> None:
    store = clocked.store
    lease = await store.reserve("long", (DAY,), 900, ttl=3)
    assert lease.lease_id
    assert await store.renew("long", lease.lease_id, ttl=0.1)
    await clocked.wait(1.1)
    assert not (await store.reserve("long", (DAY,), 200, ttl=60)).ok


def _store_now(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    return float(seconds) + micros / 1e6


@contextlib.contextmanager
def skewed(monkeypatch: pytest.MonkeyPatch, offset: float) -> Iterator[None]:
    """This replica's clock is ``offset`` seconds off: every ``time.time()`` in the
    process says so while the block runs (the old code read it for windows and
    deadlines; the store must not depend on it at all)."""
    real = time.time
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: real() + offset)
        yield


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
async def test_replicas_with_skewed_clocks_share_windows_and_leases(
        redis_prefix: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
        offset: float) -> None:
    url, prefix = redis_prefix
    # the hour window must not turn over during the test (on the store's clock)
    left = 3600 - _store_now(url) % 3600
    if left < 5:
        await asyncio.sleep(left + 0.1)
    a = RedisBudgetStore(redis_from_uri(url), prefix)
    b = RedisBudgetStore(redis_from_uri(url), prefix)
    windows = (DAY, HOUR)
    try:
        first = await a.reserve("alice", windows, 200, ttl=60)
        with skewed(monkeypatch, offset):
            # B sees A's lease, in the same windows (not an hour away), and holds its own
            second = await b.reserve("alice", windows, 200, ttl=60)
            assert second.ok and second.remaining == [600, 100]
            assert not (await b.reserve("alice", windows, 150, ttl=60)).ok
        # neither replica reclaimed the other's live lease, so the hour is still full
        assert first.ok and not (await a.reserve("alice", windows, 150, ttl=60)).ok
        third = await a.reserve("alice", windows, 100, ttl=60)
        assert third.ok and third.remaining == [500, 0], "budget overshot"
        assert first.lease_id and second.lease_id and third.lease_id
        with skewed(monkeypatch, offset):
            assert not (await b.reserve("alice", windows, 1, ttl=60)).ok
            assert await b.renew("alice", first.lease_id, ttl=60)   # A's lease is live
            assert await b.settle("alice", first.lease_id, 150)     # settled across replicas
            on_b = await b.usage("alice", windows)
        assert await a.renew("alice", second.lease_id, ttl=60)       # B's lease is live
        on_a = await a.usage("alice", windows)
        assert [(w.used, w.reserved, w.reset_at) for w in on_a] == \
            [(w.used, w.reserved, w.reset_at) for w in on_b] == \
            [(150, 300, on_a[0].reset_at), (150, 300, on_a[1].reset_at)]
        # resets and now are on the store's clock: the same whichever replica asks
        assert abs(on_b[1].now - on_a[1].now) < 60
        assert 0 < on_a[1].reset_at - on_a[1].now <= 3600
        assert third.resets[1] == on_a[1].reset_at
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_resent_reserve_is_not_reserved_twice(redis_prefix: tuple[str, str]) -> None:
    """redis-py resends a command after a timeout; the script ran the first time."""
    url, prefix = redis_prefix
    store = RedisBudgetStore(redis_from_uri(url), prefix)
    try:
        fixed = iter(["lease-1", "lease-1", "lease-2"])
        store.new_lease_id = lambda: next(fixed)  # type: ignore[assignment]
        assert (await store.reserve("resent", (DAY,), 400, ttl=60)).ok
        again = await store.reserve("resent", (DAY,), 400, ttl=60)
        assert again.ok and again.remaining == [600]
        (day,) = await store.usage("resent", (DAY,))
        assert day.reserved == 400
        assert await store.settle("resent", "lease-1", 100)
        (day,) = await store.usage("resent", (DAY,))
        assert (day.used, day.reserved) == (100, 0)
    finally:
        await store.aclose()
