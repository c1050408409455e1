"""The same budget semantics on memory:// and on the real Redis (Lua)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from guardproxy.state.budgets import BudgetStore, MemoryBudgetStore, Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.redis_client import redis_from_uri

DAY = Window(limit=1000, seconds=86400)
MINUTE = Window(limit=300, seconds=60)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore()
        return
    url, prefix = request.getfixturevalue("redis_prefix")
    s = RedisBudgetStore(redis_from_uri(url), prefix)
    yield s
    await s.aclose()


async def test_reserve_all_windows_or_none(store: BudgetStore) -> None:
    first = await store.reserve("alice", (DAY, MINUTE), 200, ttl=60)
    assert first.ok and first.remaining == [800, 100]
    refused = await store.reserve("alice", (DAY, MINUTE), 150, ttl=60)
    assert not refused.ok and refused.remaining == [800, 100]
    # nothing of the refused request was taken from the day window
    state = await store.usage("alice", (DAY, MINUTE))
    assert [(w.used, w.reserved) for w in state] == [(0, 200), (0, 200)]


async def test_settle_charges_actual_once(store: BudgetStore) -> None:
    r = await store.reserve("bob", (DAY,), 300, ttl=60)
    assert r.lease_id is not None
    assert await store.settle("bob", r.lease_id, 120)
    assert not await store.settle("bob", r.lease_id, 120)  # idempotent
    (day,) = await store.usage("bob", (DAY,))
    assert (day.used, day.reserved, day.remaining) == (120, 0, 880)


async def test_release_returns_everything(store: BudgetStore) -> None:
    r = await store.reserve("carol", (DAY,), 999, ttl=60)
    assert r.lease_id and await store.settle("carol", r.lease_id, 0)
    assert (await store.reserve("carol", (DAY,), 1000, ttl=60)).ok


async def test_expired_lease_is_reclaimed_and_late_settle_still_charges(
        store: BudgetStore) -> None:
    dead = await store.reserve("dave", (DAY,), 900, ttl=0.2)
    assert dead.ok and dead.lease_id
    assert not (await store.reserve("dave", (DAY,), 200, ttl=60)).ok
    await asyncio.sleep(1.1)
    # the replica holding the lease "died": its reservation comes back after the TTL
    assert (await store.reserve("dave", (DAY,), 200, ttl=60)).ok
    # ...and if it was only slow, its real usage is still charged, once
    assert await store.settle("dave", dead.lease_id, 50)
    (day,) = await store.usage("dave", (DAY,))
    assert (day.used, day.reserved) == (50, 200)


async def test_concurrent_reservations_never_overshoot(store: BudgetStore) -> None:
    results = await asyncio.gather(*(store.reserve("erin", (DAY,), 7, ttl=60)
                                     for _ in range(300)))
    granted = [r for r in results if r.ok]
    assert len(granted) == 1000 // 7
    assert min(r.remaining[0] for r in granted) == 1000 - 7 * len(granted)
