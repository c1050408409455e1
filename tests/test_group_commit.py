"""Group commit (state/group.py): concurrent requests share store calls, each gets its
own results, a failed call fails only its own submitters, a cancelled submitter's items
still land; and on Redis many requests' settles go in few calls, charged exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from guardproxy.state.budgets import Settle, Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.group import GroupCommit


class Store:
    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = asyncio.Event()

    async def send(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("store failed")
        return [i * 10 for i in items]


async def test_a_lone_request_calls_at_once_and_waiters_share_the_next_call() -> None:
    store = Store()
    group = GroupCommit(store.send)
    first = asyncio.create_task(group.submit([1]))
    for _ in range(3):   # the submitter, then the call's task, start: no timer involved
        await asyncio.sleep(0)
    assert store.calls == [[1]], "no waiting on purpose"
    rest = [asyncio.create_task(group.submit([n, n + 1])) for n in (2, 4, 6)]
    await asyncio.sleep(0)
    store.gate.set()
    assert await first == [10]
    assert [await t for t in rest] == [[20, 30], [40, 50], [60, 70]]
    assert store.calls == [[1], [2, 3, 4, 5, 6, 7]], "one call for all who waited"


async def test_a_failed_call_fails_only_its_own_submitters() -> None:
    store = Store(fail_on=3)
    group = GroupCommit(store.send, max_items=2)
    tasks = [asyncio.create_task(group.submit([n])) for n in (1, 2, 3, 4)]
    await asyncio.sleep(0)
    store.gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == [10] and done[1] == [20]
    assert all(isinstance(d, ValueError) for d in done[2:])
    assert store.calls == [[1], [2, 3], [4]] or store.calls == [[1, 2], [3, 4]]


async def test_a_cancelled_submitter_does_not_cancel_the_call() -> None:
    store = Store()
    group = GroupCommit(store.send)
    task = asyncio.create_task(group.submit([5]))
    await asyncio.sleep(0)
    task.cancel()
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert group.task is not None
    await group.task
    assert store.calls == [[5]], "the store call was made all the same"


async def test_many_requests_settle_in_few_calls_on_redis(
        redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    client = aioredis.Redis.from_url(url)
    store = RedisBudgetStore(client, prefix)
    window = (Window(100_000, 3600),)
    try:
        leases = [await store.reserve(f"s{i % 5}", window, 100, 60) for i in range(60)]
        assert all(r.ok and r.lease_id for r in leases)
        before = store._group.calls
        results = await asyncio.gather(*(store.settle_many(
            [Settle(f"s{i % 5}", r.lease_id or "", 7)]) for i, r in enumerate(leases)))
        assert results == [[True]] * 60
        assert 1 <= store._group.calls - before < 10, "calls shared by concurrent requests"
        again = await store.settle_many([Settle("s0", leases[0].lease_id or "", 7)])
        assert again == [False], "charged once"
        for s in range(5):
            (state,) = await store.usage(f"s{s}", window)
            assert (state.used, state.reserved) == (12 * 7, 0)
    finally:
        await client.aclose()
