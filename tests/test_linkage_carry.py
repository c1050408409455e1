"""``per: cluster`` usage follows a cluster across merges (``linkage/carry.py``): the
budget stores' ``carry``, the quota carry, the merge events, rebuilds, and the app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from guardproxy import GuardMiddleware
from guardproxy.exchange import Exchange
from guardproxy.linkage.api import Evidence, LinkageStore
from guardproxy.linkage.carry import Merge, MergeFeed, id_changes
from guardproxy.linkage.enricher import LinkageEnricher
from guardproxy.linkage.memory import MemoryLinkageStore
from guardproxy.linkage.redis import RedisLinkageStore
from guardproxy.linkage.settings import LinkageSettings
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Account
from guardproxy.state.budgets import BudgetStore, Carry, MemoryBudgetStore, Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.redis_client import redis_from_uri
from tests.redis_topologies import redis_cluster
from tests.test_budget import usage_app
from tests.test_linkage_enforce import CHAT, SECRET, chat, linkage_policy

DAY = Window(limit=1000, seconds=86400)
MINUTE = Window(limit=500, seconds=60)
LINKAGE = f"""
linkage:
  secret: {SECRET}
  window: 30d
  signals:
    - {{attribute: payment, weight: 1.0, max_fanout: 5}}
    - {{header: x-device-id, weight: 1.0, max_fanout: 5}}
"""
T0 = 1_764_460_800.0
DAYS = 86400.0


@pytest.fixture(params=["memory", "redis"])
async def budgets(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore()
        return
    url, prefix = request.getfixturevalue("redis_prefix")
    store = RedisBudgetStore(redis_from_uri(url), prefix)
    yield store
    await store.aclose()


async def spend(store: BudgetStore, subject: str, reserved: int, actual: int) -> str:
    """Reserve ``reserved`` in both windows and settle ``actual``; the lease id."""
    lease = await store.reserve(subject, (DAY, MINUTE), reserved, ttl=60)
    assert lease.ok and lease.lease_id is not None
    await store.settle(subject, lease.lease_id, actual)
    return lease.lease_id


async def used(store: BudgetStore, subject: str) -> list[tuple[int, int]]:
    return [(w.used, w.reserved) for w in await store.usage(subject, (DAY, MINUTE))]


# -- the budget stores ----------------------------------------------------------------
async def test_carry_adds_what_the_source_used_once(budgets: BudgetStore) -> None:
    await spend(budgets, "r|cluster=b", 100, 60)
    held = await budgets.reserve("r|cluster=b", (DAY, MINUTE), 50, ttl=60)
    await spend(budgets, "r|cluster=a", 30, 30)
    move = [Carry("r|cluster=b", "r|cluster=a", (DAY, MINUTE))]
    assert await budgets.carry(move) == 2 * 60, "used tokens, in both windows"
    assert await used(budgets, "r|cluster=a") == [(90, 0), (90, 0)], "not the reservation"
    assert await used(budgets, "r|cluster=b") == [(60, 50), (60, 50)], "the source keeps it"
    assert await budgets.carry(move) == 0, "the same merge reported again adds nothing"
    assert await used(budgets, "r|cluster=a") == [(90, 0), (90, 0)]
    # the reservation in flight settles under the old id; a later report carries it
    assert held.lease_id is not None
    await budgets.settle("r|cluster=b", held.lease_id, 40)
    assert await budgets.carry(move) == 2 * 40
    assert await used(budgets, "r|cluster=a") == [(130, 0), (130, 0)]


async def test_a_batch_is_carried_in_order(budgets: BudgetStore) -> None:
    """c joins b, then b joins a: a ends up with all three."""
    for subject, amount in (("r|cluster=a", 10), ("r|cluster=b", 20), ("r|cluster=c", 40)):
        await spend(budgets, subject, amount, amount)
    windows = (DAY, MINUTE)
    assert await budgets.carry([Carry("r|cluster=c", "r|cluster=b", windows),
                                Carry("r|cluster=b", "r|cluster=a", windows),
                                Carry("r|cluster=a", "r|cluster=a", windows)]) == 2 * (40 + 60)
    assert await used(budgets, "r|cluster=a") == [(70, 0), (70, 0)]
    assert await budgets.carry([]) == 0


async def test_carry_on_redis_cluster_reads_then_adds(tmp_path: Path) -> None:
    """Source and target are in different slots there: two calls, still once."""
    with redis_cluster(tmp_path) as uri:
        store = RedisBudgetStore(redis_from_uri(uri), "gpcarry")
        try:
            await spend(store, "r|cluster=b", 100, 70)
            move = [Carry("r|cluster=b", "r|cluster=a", (DAY, MINUTE))]
            assert await store.carry(move) == 2 * 70
            assert await store.carry(move) == 0
            assert await used(store, "r|cluster=a") == [(70, 0), (70, 0)]
        finally:
            await store.aclose()


# -- merge events and rebuilds ------------------------------------------------------------
def settings_of(tmp_path: Path) -> LinkageSettings:
    settings = load_policy(linkage_policy(tmp_path, "rules: []\n", linkage=LINKAGE)).linkage
    assert settings is not None
    return settings


@pytest.fixture(params=["memory", "redis"])
async def linkage_store(request: pytest.FixtureRequest,
                        tmp_path: Path) -> AsyncIterator[tuple[LinkageStore, MergeFeed]]:
    settings = settings_of(tmp_path)
    feed = MergeFeed()
    if request.param == "memory":
        yield MemoryLinkageStore(settings, on_event=feed), feed
        return
    url, prefix = request.getfixturevalue("redis_prefix")
    client = aioredis.Redis.from_url(url)
    yield RedisLinkageStore(client, prefix, settings, on_event=feed), feed
    await client.aclose()


def card(n: int) -> list[Evidence]:
    return [Evidence("attribute:payment", f"{n:064x}")]


async def test_merges_name_the_absorbed_id_and_a_rebuild_reports_changed_ids(
        linkage_store: tuple[LinkageStore, MergeFeed], tmp_path: Path) -> None:
    store, feed = linkage_store
    heard: list[list[Merge]] = []

    async def on_merge(merges: Sequence[Merge]) -> None:
        heard.append(list(merges))

    feed.on_merge = on_merge
    enricher = LinkageEnricher(settings_of(tmp_path), store, PairFinder(settings_of(tmp_path)),
                               clock=lambda: T0 + 31 * DAYS, merges=feed)
    await enricher.start()
    await store.record("a", card(1), T0)
    await store.record("b", card(1), T0)               # b joins a
    await store.record("b", card(2), T0 + 20 * DAYS)
    await store.record("c", card(2), T0 + 20 * DAYS)   # c joins a (through b)
    await feed.idle()
    assert [m for batch in heard for m in batch] == [Merge("b", "a"), Merge("c", "a")]
    heard.clear()
    # 31 days on, card 1 has expired: a leaves, and {b, c} is cluster b from now on
    await enricher.rebuild()
    await feed.idle()
    assert (await store.cluster("c")).id == "b"
    assert heard == [[Merge("a", "b")]]
    await enricher.aclose()


def test_rebuild_changes_read_each_id_before_adding_to_it() -> None:
    before = {"a": "a", "z": "a", "m": "m", "t": "m"}      # {a, z} and {m, t}
    after = {"m": "m", "z": "m", "s": "s", "t": "s"}       # {m, z} and {s, t}; a alone
    assert id_changes(before, after) == [Merge("m", "s"), Merge("a", "m")], \
        "m's own usage goes to s before a's is added to m"
    assert id_changes({"a": "a", "b": "a"}, {"a": "a", "b": "a"}) == []
    swapped = id_changes({"a": "a", "c": "a", "b": "b", "d": "b"},   # {a, c} and {b, d}
                         {"a": "a", "d": "a", "b": "b", "c": "b"})   # {a, d} and {b, c}
    assert len(swapped) == 2 and set(swapped) == {Merge("a", "b"), Merge("b", "a")}, \
        "a cycle: both, once"


async def test_a_reservation_in_flight_at_the_merge_is_carried_by_the_second_pass(
        budgets: BudgetStore) -> None:
    """A merge found in the background lands while the request that completed it is
    reserved under the old id: its settle is carried ``again_after`` seconds later."""
    now = [0.0]

    async def on_merge(merges: Sequence[Merge]) -> None:
        await budgets.carry([Carry(f"r|{m.absorbed}", f"r|{m.cluster}", (DAY, MINUTE))
                             for m in merges])

    feed = MergeFeed(on_merge, again_after=600.0, clock=lambda: now[0])
    task = asyncio.get_running_loop().create_task(feed.run())
    await spend(budgets, "r|b", 30, 30)
    in_flight = await budgets.reserve("r|b", (DAY, MINUTE), 100, ttl=60)
    feed.add([Merge("b", "a")])
    await feed.idle()
    assert await used(budgets, "r|a") == [(30, 0), (30, 0)]
    assert in_flight.lease_id is not None
    await budgets.settle("r|b", in_flight.lease_id, 80)
    feed.poke()
    await feed.idle()
    assert await used(budgets, "r|a") == [(30, 0), (30, 0)], "not due yet"
    now[0] = 600.0
    feed.poke()
    await feed.idle()
    assert await used(budgets, "r|a") == [(110, 0), (110, 0)]
    assert not feed.later and feed.counters.batches == 2
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_no_carry_wired_queues_nothing(tmp_path: Path) -> None:
    feed = MergeFeed()
    store = MemoryLinkageStore(settings_of(tmp_path), on_event=feed)
    await store.record("a", card(1), T0)
    await store.record("b", card(1), T0)
    assert feed.pending == []


# -- through the app ----------------------------------------------------------------------
def on_device(key: str, device: str) -> dict[str, Any]:
    request = chat(key, max_tokens=100)   # usage_app charges 10 + 100 // 2 = 60 tokens
    request["headers"]["x-device-id"] = device
    return request


def app_options(request: pytest.FixtureRequest, where: str) -> dict[str, str]:
    if where == "memory":
        return {}
    url, prefix = request.getfixturevalue("redis_prefix")
    return {"state": url, "key_prefix": prefix}


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_accounts_linked_mid_day_share_one_budget_with_what_they_spent_before(
        tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:
    """dave and erin spend apart, then erin uses dave's device: from then on the two
    take one budget, and what erin spent before the link counts in it."""
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, """
rules:
  - name: tokens
    budget: 1000/day
    per: cluster
""", linkage=LINKAGE, **app_options(request, where)))
    assert app.linkage is not None
    assert app.linkage.merges.again_after == 5 + 60, "the second pass: after the lease TTL"
    successes = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        for key, device in [("key-dave", "dev-d"), ("key-erin", "dev-e")] * 3:
            assert (await c.post(CHAT, **on_device(key, device))).status_code == 200
        linking = await c.post(CHAT, **on_device("key-erin", "dev-d"))
        assert linking.status_code == 200
        successes = 7
        await app.linkage.merges.idle()
        (day,) = await app.state.budgets.usage("tokens|cluster=dave", (DAY,))
        assert day.used == 7 * 60, "dave's 3, erin's 3 from before the link, the linking one"
        for i in range(30):
            r = await c.post(CHAT, **on_device(("key-dave", "key-erin")[i % 2], "dev-x"))
            if r.status_code == 429:
                break
            assert r.status_code == 200
            successes += 1
        else:
            raise AssertionError("the budget never ran out")
        (day,) = await app.state.budgets.usage("tokens|cluster=dave", (DAY,))
        await app.linkage.aclose()
    await app.state.aclose()
    assert day.used == successes * 60 <= 1000, "one budget for everything the two took"


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window", "moving-window"])
@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_cluster_quotas_carry_the_hits_counted_before_the_link(
        tmp_path: Path, request: pytest.FixtureRequest, where: str, strategy: str) -> None:
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, f"""
rules:
  - name: requests
    quota: 8/day
    per: cluster
    strategy: {strategy}
""", linkage=LINKAGE, **app_options(request, where)))
    assert app.linkage is not None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        for key, device in [("key-dave", "dev-d"), ("key-erin", "dev-e")] * 3:
            assert (await c.post(CHAT, **on_device(key, device))).status_code == 200
        after = []
        for i in range(10):
            r = await c.post(CHAT, **on_device(("key-erin", "key-dave")[i % 2], "dev-d"))
            after.append(r.status_code)
            await app.linkage.merges.idle()
        await app.linkage.aclose()
    await app.state.aclose()
    # dave's 3 + the linking request + erin's 3 carried: one more fits in 8
    carried = {"fixed-window": 3, "sliding-window": 3, "moving-window": 0}[strategy]
    assert after.count(200) == 8 - 3 - carried
    assert after == [200] * after.count(200) + [429] * (10 - after.count(200))


async def test_the_carry_runs_off_the_request_path(tmp_path: Path) -> None:
    settings = settings_of(tmp_path)
    feed = MergeFeed()
    calls: list[list[Merge]] = []

    async def on_merge(merges: Sequence[Merge]) -> None:
        calls.append(list(merges))

    feed.on_merge = on_merge
    enricher = LinkageEnricher(settings, MemoryLinkageStore(settings, on_event=feed),
                               PairFinder(settings), merges=feed)
    for name in ("erin", "dave"):
        account = Account(name, f"org-{name}", "free", (("payment", "card-9"),))
        await enricher.enrich(Exchange("POST", CHAT, {}, "203.0.113.9", account=account))
    assert calls == [], "enrich returned before any carry ran"
    await feed.idle()
    assert calls == [[Merge("erin", "dave")]]
    await enricher.aclose()
