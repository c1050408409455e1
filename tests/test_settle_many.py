"""All of a request's budget leases settle in one store call (guardproxy issue 12).

- On one Redis, the default-like policy (a per-account and a per-org budget rule) costs
  one EVALSHA after the response, not one per rule (counted with MONITOR).
- ``settle_many`` charges what settling one by one charges, on memory and on Redis,
  with the same idempotence (a lease settled twice charges once).
- A batch that fails is queued lease by lease and lands later, charged exactly once.
- On Redis Cluster it is one call per hash slot, sent concurrently.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import httpx
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from guardproxy.app import create_app
from guardproxy.errors import StoreError
from guardproxy.fake_model import create_fake_app
from guardproxy.state.admission_redis import admit_script
from guardproxy.state.budgets import BudgetStore, MemoryBudgetStore, Settle, Window
from guardproxy.state.budgets_redis import RedisBudgetStore, _script
from guardproxy.state.retry import PendingSettle, SettleRetry
from tests.conftest import write_policy
from tests.redis_monitor import monitored, names
from tests.servers import running_server

DAY = Window(limit=100_000, seconds=86400)
MONTH = Window(limit=1_000_000, seconds=30 * 86400)
WINDOWS = (DAY, MONTH)


def _sha(*names: str) -> str:
    return hashlib.sha1(_script(*names).encode()).hexdigest()


def test_two_budget_rules_settle_in_one_round_trip(
        tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix

    with running_server(create_fake_app()) as fake:
        policy = write_policy(tmp_path, """
rules:
  - name: free-tokens
    when: {tier: free}
    budget: 200000/day; 2000000/month
    per: account
    on_exhausted: clamp
    min_tokens: 64
  - name: org-tokens
    budget: 20000000/day
    per: org
""", upstream=fake, state=redis_url, key_prefix=prefix)
        with running_server(create_app(policy)) as url:
            def call() -> None:
                r = httpx.post(url + "/v1/chat/completions", timeout=10,
                               json={"model": "m", "max_tokens": 5, "messages": []},
                               headers={"authorization": "Bearer key-alice"})
                assert r.status_code == 200

            call()  # warm-up: loads the Lua scripts
            with monitored(redis_url, prefix) as commands:
                call()
    admit = hashlib.sha1(admit_script(recording=False).encode()).hexdigest()
    settle_many = _sha("lease_common.lua", "budget_settle_many.lua")
    assert names(commands) == ["EVALSHA"] * 2, commands  # admission, one settle for both
    shas = [c[1].strip('"') for c in commands]
    assert shas == [admit, settle_many], commands
    assert commands[1][2] == "4", commands  # both leases' keys: 2 rules x (leases, deadlines)
    left = redis.Redis.from_url(redis_url)
    try:
        used = {k.decode(): left.hget(k, "used") for k in left.scan_iter(f"{prefix}:*:w*")}
    finally:
        left.close()
    assert used and all(v is not None and int(v) > 0 for v in used.values()), used


async def _scenario(store: BudgetStore, batch: bool, sleep: Callable[[], Any]) -> list[Any]:
    """Reserve on two subjects, let one lease expire (reclaimed), then settle a live
    lease, an expired one, an unknown one and a released one, twice over; return what
    each settle said and the usage of every subject."""
    live = await store.reserve("acct|alice", WINDOWS, 500, ttl=600)
    org = await store.reserve("org|acme", (DAY,), 700, ttl=600)
    gone = await store.reserve("acct|carol", WINDOWS, 300, ttl=0.05)
    free = await store.reserve("org|acme", (DAY,), 40, ttl=600)
    assert live.lease_id and org.lease_id and gone.lease_id and free.lease_id
    await sleep()
    await store.reserve("acct|carol", WINDOWS, 1, ttl=600)  # reclaims the expired lease
    items = [Settle("acct|alice", live.lease_id, 120), Settle("org|acme", org.lease_id, 120),
             Settle("acct|carol", gone.lease_id, 90), Settle("acct|alice", "nope", 5),
             Settle("org|acme", free.lease_id, 0)]
    said: list[Any] = []
    for _ in range(2):  # the second round is all repeats: nothing more is charged
        if batch:
            said.append(await store.settle_many(items))
        else:
            said.append([await store.settle(i.subject, i.lease_id, i.actual) for i in items])
    usage = [(w.used, w.reserved) for subject, windows in
             (("acct|alice", WINDOWS), ("org|acme", (DAY,)), ("acct|carol", WINDOWS))
             for w in await store.usage(subject, windows)]
    return [said, usage]


async def test_settle_many_matches_settling_one_by_one(redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix
    now = [1_000_000.0]

    async def tick() -> None:
        now[0] += 1.0

    async def wait() -> None:
        await asyncio.sleep(0.3)  # the store's own clock passes the 0.05 s lease TTL

    results = []
    for batch in (False, True):
        results.append(await _scenario(MemoryBudgetStore(clock=lambda: now[0]), batch, tick))
        client = aioredis.Redis.from_url(redis_url)
        store = RedisBudgetStore(client, f"{prefix}-{batch}")
        try:
            results.append(await _scenario(store, batch, wait))
        finally:
            await store.aclose()
    expected = [[[True, True, True, False, True], [False] * 5],
                [(120, 0), (120, 0), (120, 0), (90, 1), (90, 1)]]
    assert results == [expected] * 4


async def test_settle_many_of_nothing_calls_nothing() -> None:
    assert await MemoryBudgetStore().settle_many([]) == []
    client = MagicMock()
    assert await RedisBudgetStore(client, "gp").settle_many([]) == []


class FlakyStore(MemoryBudgetStore):
    """A memory store whose batches land their first item, then fail, while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.batches = 0

    async def settle_many(self, items: Sequence[Settle]) -> list[bool]:
        self.batches += 1
        if self.down:
            await super().settle(items[0].subject, items[0].lease_id, items[0].actual)
            raise StoreError("store down")
        return await super().settle_many(items)

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        if self.down:
            raise StoreError("store down")
        return await super().settle(subject, lease_id, actual)


async def test_a_failed_batch_is_retried_lease_by_lease_and_charged_once() -> None:
    store = FlakyStore()
    a = await store.reserve("acct|alice", WINDOWS, 300, ttl=600)
    b = await store.reserve("org|acme", (DAY,), 400, ttl=600)
    assert a.lease_id and b.lease_id
    settles = SettleRetry(base_delay=0.01, max_delay=0.02)
    try:
        said = await settles.settle_many([PendingSettle(store, "acct|alice", a.lease_id, 120),
                                          PendingSettle(store, "org|acme", b.lease_id, 150)])
        assert said == [None, None]
        assert store.batches == 1
        assert (settles.queued, settles.dropped) == (2, 0)
        assert settles.pending >= 1
        store.down = False
        deadline = time.monotonic() + 20.0  # only stops a broken test from hanging
        while settles.pending:
            assert time.monotonic() < deadline, "the queued settles did not land"
            await asyncio.sleep(0.02)
        assert settles.retried == 2 and settles.dropped == 0
        usage = [(w.used, w.reserved) for w in await store.usage("acct|alice", WINDOWS)]
        assert usage == [(120, 0), (120, 0)], "the lease that landed in the batch: once"
        (org,) = await store.usage("org|acme", (DAY,))
        assert (org.used, org.reserved) == (150, 0)
    finally:
        await settles.aclose()


async def test_settle_many_groups_by_store() -> None:
    one, two = MemoryBudgetStore(), MemoryBudgetStore()
    a = await one.reserve("s", (DAY,), 10, ttl=600)
    b = await two.reserve("s", (DAY,), 10, ttl=600)
    assert a.lease_id and b.lease_id
    settles = SettleRetry()
    said = await settles.settle_many([PendingSettle(one, "s", a.lease_id, 3),
                                      PendingSettle(two, "s", b.lease_id, 4),
                                      PendingSettle(one, "s", a.lease_id, 3)])
    assert said == [True, True, False]
    assert [(await s.usage("s", (DAY,)))[0].used for s in (one, two)] == [3, 4]
    await settles.aclose()


async def test_on_a_cluster_one_call_per_slot_sent_concurrently() -> None:
    client = MagicMock(spec=RedisCluster)
    store = RedisBudgetStore(client, "gp")
    subjects = ["acct|alice", "org|acme", "acct|bob"]
    slots = {s: key_slot(store._tag(s).encode()) for s in subjects}
    assert len(set(slots.values())) == 3
    calls: list[tuple[list[str], list[Any]]] = []
    started = 0
    both = asyncio.Event()

    async def script(keys: list[str], args: list[Any]) -> list[int]:
        nonlocal started
        calls.append((keys, args))
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
        started += 1
        if started == 3:
            both.set()
        await asyncio.wait_for(both.wait(), 5)  # every call is in flight at once
        return [int(a != "gone") for a in args[::2]]

    script.sha = "fake"   # type: ignore[attr-defined]
    store._loaded.add("fake")   # loaded on every primary already
    store._settle_many = script
    items = [Settle("acct|alice", "l1", 5), Settle("org|acme", "l2", 6),
             Settle("acct|alice", "gone", 7), Settle("acct|bob", "l3", 8)]
    assert await store.settle_many(items) == [True, True, False, True]
    assert len(calls) == 3
    by_subject = {keys[0].split("{")[1].split("}")[0]: args for keys, args in calls}
    assert by_subject == {"acct|alice": ["l1", 5, "gone", 7], "org|acme": ["l2", 6],
                          "acct|bob": ["l3", 8]}
