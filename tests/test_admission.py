"""Admission batches (issue 12): the Redis script and the memory store judge the same
batches the same way, on the same clock.

Random batches of quota, budget, linkage-gate and refusal asks, shadow or enforced,
with clamping budgets and settles in between, go to ``MemoryAdmission`` and to
``RedisAdmission`` (admit.lua) driven by one test clock; every result must agree:
status, the denying window, what is left and when it resets, the amount reserved and
the cap a clamp chose, whether a lease is held. Then the properties the flow relies on:
a denied batch holds nothing and counts nothing; ``per: cluster`` keys are filled in
with the cluster the same call recorded, escaped as ``guards/per.py`` escapes values.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from guardproxy.linkage.api import Cluster, Evidence
from guardproxy.linkage.redis import RedisLinkageStore
from guardproxy.linkage.settings import LinkageSettings, SignalSpec
from guardproxy.state.admission import (
    ALLOWED,
    DENIED,
    SKIPPED,
    Ask,
    BudgetAsk,
    GateAsk,
    QuotaAsk,
    RecordAsk,
    Refusal,
    Result,
    escape,
)
from guardproxy.state.admission_memory import MemoryAdmission
from guardproxy.state.admission_redis import RedisAdmission
from guardproxy.state.budgets import MemoryBudgetStore, Settle, Window
from guardproxy.state.budgets_redis import RedisBudgetStore


class Clock:
    def __init__(self, now: float = 1_800_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def stores(redis_prefix: tuple[str, str]) -> AsyncIterator[tuple[Any, ...]]:
    url, prefix = redis_prefix
    clock = Clock()
    client = aioredis.Redis.from_url(url)
    budgets = RedisBudgetStore(client, prefix)
    memory_budgets = MemoryBudgetStore(clock)
    yield (MemoryAdmission(memory_budgets, clock), memory_budgets,
           RedisAdmission(client, prefix, clock), budgets, clock)
    await client.aclose()


def _asks(rng: random.Random, lease: int) -> list[Ask]:
    asks: list[Ask] = []
    rules = rng.sample(["r1", "r2", "r3", "b1", "b2", "g1"], rng.randint(1, 5))
    for rule in rules:
        shadow = rng.random() < 0.2
        key = (f"account={rng.choice('ab')}",)
        if rule.startswith("r"):
            windows = {"r1": ((3, 2),), "r2": ((2, 1), (5, 7)), "r3": ((4, 3), (9, 60))}[rule]
            strategy = {"r1": "f", "r2": "s", "r3": "m"}[rule]
            asks.append(QuotaAsk(rule, shadow, strategy, key, windows))
        elif rule.startswith("b"):
            asks.append(BudgetAsk(
                rule=rule, shadow=shadow, subject=(f"{rule}|{key[0]}",), lease_id=f"L{lease}{rule}",
                generates=rng.random() < 0.9, prompt_weight=rng.choice([1.0, 0.5, 0.0]),
                prompt=rng.randint(0, 40), completion_weight=rng.choice([1.0, 4.0, 0.25]),
                copies=rng.randint(1, 3), cap=rng.randint(1, 120), clamp=rng.random() < 0.5,
                min_tokens=rng.randint(1, 30),
                windows=(Window(400, 5),) if rule == "b1" else (Window(300, 3), Window(900, 11)),
                ttl=rng.choice([1.0, 4.0, 30.0])))
        else:
            asks.append(GateAsk(rule, shadow, rng.choice([None, 1]), rng.random() < 0.5))
    if rng.random() < 0.1:
        asks.insert(rng.randint(0, len(asks)), Refusal("refused"))
    return asks


def _same(a: Result, b: Result) -> tuple[Any, ...]:
    def shape(r: Result) -> tuple[Any, ...]:
        return (r.status, r.denied, r.amount, r.cap, r.remaining,
                tuple(round(x, 6) for x in r.resets), r.lease_id is not None)
    return shape(a), shape(b)


@pytest.mark.parametrize("seed", range(6))
async def test_memory_and_redis_judge_every_batch_alike(stores: tuple[Any, ...],
                                                        seed: int) -> None:
    memory, memory_budgets, red, red_budgets, clock = stores
    rng = random.Random(seed)
    held: list[tuple[str, str, str]] = []   # (subject, memory lease, redis lease)
    for step in range(150):
        clock.now += rng.choice([0.0, 0.0, 0.001, 0.3, 0.9, 1.0, 2.5, 7.0])
        asks = _asks(rng, step)
        a, b = await memory.admit(asks), await red.admit(asks)
        assert a.stopped == b.stopped, (seed, step, asks)
        assert a.now == b.now
        for ask, x, y in zip(asks, a.results, b.results, strict=True):
            left, right = _same(x, y)
            assert left == right, (seed, step, ask)
            if isinstance(ask, BudgetAsk) and x.lease_id and y.lease_id:
                held.append((ask.subject[0], x.lease_id, y.lease_id))
        if held and rng.random() < 0.6:   # settle some leases, same charge on both
            rng.shuffle(held)
            done, held = held[:2], held[2:]
            for subject, m, r in done:
                actual = rng.randint(0, 60)
                assert await memory_budgets.settle(subject, m, actual) == \
                    (await red_budgets.settle_many([Settle(subject, r, actual)]))[0]


async def test_a_denied_batch_holds_and_counts_nothing(stores: tuple[Any, ...]) -> None:
    for admission in stores[0], stores[2]:
        quota = QuotaAsk("q", False, "s", ("account=a",), ((5, 60),))
        budget = BudgetAsk("b", False, ("b|account=a",), "L1", True, 1.0, 10, 1.0, 1, 50,
                           False, 16, (Window(1000, 60),), 30.0)
        full = BudgetAsk("c", False, ("c|account=a",), "L2", True, 1.0, 10, 1.0, 1, 50,
                         False, 16, (Window(20, 60),), 30.0)
        batch = await admission.admit([quota, budget, full])
        assert batch.stopped
        assert [r.status for r in batch.results] == [ALLOWED, ALLOWED, DENIED]
        assert batch.results[1].lease_id is None, "released inside the call"
        again = await admission.admit([quota, budget])
        assert not again.stopped
        assert again.results[0].remaining == (4,), "the denied request counted nowhere"
        assert again.results[1].remaining == (1000 - 60,), "and reserved nothing"
        after = await admission.admit([Refusal("shaping"), quota])
        assert after.stopped and [r.status for r in after.results] == [DENIED, SKIPPED]
        assert (await admission.quota_state(quota)).remaining == (4,), "a refusal counts nothing"


async def test_a_clamp_lowers_the_cap_for_the_later_budget_rules(stores: tuple[Any, ...]) -> None:
    for admission in stores[0], stores[2]:
        first = BudgetAsk("f", False, ("f|account=a",), "L3", True, 1.0, 10, 1.0, 2, 100,
                          True, 16, (Window(110, 60),), 30.0)
        second = BudgetAsk("s", False, ("s|org=o",), "L4", True, 1.0, 10, 1.0, 2, 100,
                           False, 16, (Window(10_000, 60),), 30.0)
        batch = await admission.admit([first, second])
        assert [r.cap for r in batch.results] == [50, 50]   # (110 - 10) / 2 copies
        assert [r.amount for r in batch.results] == [110, 110]


async def test_cluster_keys_take_the_id_the_same_call_recorded(
        redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    client = aioredis.Redis.from_url(url)
    settings = LinkageSettings(secret="s" * 32, signals=(
        SignalSpec(id="attribute:payment", kind="attribute", weight=1.0, max_fanout=5,
                   name="payment"),))
    store = RedisLinkageStore(client, prefix, settings, on_event=None)
    admission = RedisAdmission(client, prefix)
    odd = "a|b%c"   # an account id that must be escaped inside a key
    card = [Evidence("attribute:payment", "d1")]
    ask = QuotaAsk("q", False, "f", ("cluster=", ""), ((10, 60),))
    try:
        for account in ("zed", odd):
            batch = await admission.admit([ask], RecordAsk(store, account, tuple(card), 1e9))
            assert batch.cluster is not None and batch.cluster.size >= 1
        assert batch.cluster == Cluster(id=odd, size=2)   # the smallest member
        counted = await admission.quota_state(QuotaAsk("q", False, "f",
                                                       (f"cluster={escape(odd)}",),
                                                       ((10, 60),)))
        assert counted.remaining == (9,), "the second request counted under the new id"
        first = await admission.quota_state(QuotaAsk("q", False, "f", ("cluster=zed",),
                                                     ((10, 60),)))
        assert first.remaining == (9,), "the first, under zed's own id, as it was then"
    finally:
        await client.aclose()


async def test_concurrent_requests_share_calls_and_each_is_judged_alone(
        stores: tuple[Any, ...]) -> None:
    red = stores[2]
    quota = QuotaAsk("q", False, "m", ("account=a",), ((25, 60),))
    budget = BudgetAsk("b", False, ("b|account=a",), "", True, 1.0, 10, 1.0, 1, 90,
                       False, 16, (Window(3000, 60),), 30.0)
    asks = [[quota, replace(budget, lease_id=f"G{i}")] for i in range(40)]
    before = red._group.calls
    batches = await asyncio.gather(*(red.admit(a) for a in asks))
    assert 1 <= red._group.calls - before < 40, "calls shared under concurrency"
    allowed = [b for b in batches if not b.stopped]
    # 30 budgets of 100 fit, but the quota's 25 stop first: each request on its own
    assert len(allowed) == 25
    assert all(b.results[1].lease_id for b in allowed)
    assert all(b.results[1].status == SKIPPED for b in batches if b.stopped)
    assert (await red.quota_state(quota)).remaining == (0,)
