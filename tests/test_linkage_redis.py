"""Account linkage on the real Redis: the Lua store answers as the reference ``LinkGraph``
does, records a request in one round trip, keeps no raw value, and lets several proxy
processes (and Redis Cluster) enforce one ``per: cluster`` budget."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from guardproxy import GuardMiddleware
from guardproxy.app import create_app
from guardproxy.linkage.api import Evidence, PairEvidence
from guardproxy.linkage.graph import LinkGraph
from guardproxy.linkage.redis import RedisLinkageStore
from guardproxy.linkage.settings import LinkageSettings, SignalSpec
from tests.procs import fake_model, proxy
from tests.redis_monitor import monitored, names
from tests.redis_topologies import redis_cluster
from tests.servers import running_server
from tests.test_budget import usage_app
from tests.test_linkage_enforce import CHAT, chat, fake, linkage_policy

__all__ = ["fake"]   # the fixture, shared with test_linkage_enforce

SETTINGS = LinkageSettings(secret="s" * 16, window=100.0, threshold=1.0, rebuild_every=50.0,
                           max_values_per_account=3,   # reached: digests run 00..03
                           signals=(
    SignalSpec(id="attribute:payment", kind="attribute", weight=1.0, max_fanout=3,
               name="payment"),
    SignalSpec(id="ip:exact", kind="ip", weight=0.5, max_fanout=4),
    SignalSpec(id="ip:/24", kind="ip", weight=0.3, max_fanout=6, prefix=24, prefix6=64),
    SignalSpec(id="header:x-device-id", kind="header", weight=0.6, max_fanout=2,
               name="x-device-id"),
    SignalSpec(id="prompt_similarity", kind="prompt_similarity", weight=0.25,
               similarity=0.8),
    SignalSpec(id="co_activity", kind="co_activity", weight=0.5, burst=60.0)))
VALUE_SIGNALS = ["attribute:payment", "ip:exact", "ip:/24", "header:x-device-id"]
# upper case sorts before lower case and "é" after "z", as Python compares str
ACCOUNTS = ["a", "b", "B", "c10", "c2", "é", "z", "Zz", "m", "n"]


@pytest.fixture
async def aclient(redis_prefix: tuple[str, str]) -> AsyncIterator[tuple[Any, str]]:
    url, prefix = redis_prefix
    client = aioredis.Redis.from_url(url)
    yield client, prefix
    await client.aclose()


class Both:
    """The reference and the Redis store, fed the same operations, their events kept."""

    def __init__(self, client: Any, prefix: str, settings: LinkageSettings) -> None:
        self.events: tuple[list[Any], list[Any]] = ([], [])

        def keep(into: list[Any]) -> Any:
            # the time rides in JSON on Redis: compared as the rest of the event is
            return lambda kind, fields: into.append(
                (kind, {k: v for k, v in fields.items() if k != "time"}))

        self.graph = LinkGraph(settings, on_event=keep(self.events[0]))
        self.store = RedisLinkageStore(client, prefix, settings, on_event=keep(self.events[1]))

    async def same_everywhere(self, accounts: list[str], where: str) -> None:
        g, r = self.graph, self.store
        assert g.graph() == await r.graph(), where
        assert g.blocked() == await r.blocked(), where
        for a in accounts:
            assert g.cluster(a) == await r.cluster(a), (where, a)
            assert g.members(a) == await r.members(a), (where, a)
            assert g.links(a) == await r.links(a), (where, a)

    def same_events(self, where: str) -> None:
        assert self.events[0] == self.events[1], where
        self.events[0].clear()
        self.events[1].clear()


@pytest.mark.parametrize("seed", range(12))
async def test_the_redis_store_answers_as_the_link_graph(aclient: tuple[Any, str],
                                                         seed: int) -> None:
    client, prefix = aclient
    rng = random.Random(seed)
    both = Both(client, f"{prefix}-{seed}", SETTINGS)
    g, r = both.graph, both.store
    now = 1_764_460_800.0 + rng.random()
    seen = {"link": 0, "merge": 0, "hot": 0, "blocked": 0}
    for step in range(300):
        # small steps mostly; now and then a jump past the window (evidence expires)
        now += rng.expovariate(1 / 5) if rng.random() > 0.03 else 120.0
        op = rng.random()
        where = f"seed {seed} step {step}"
        if op < 0.75:
            account = rng.choice(ACCOUNTS)
            evidence = [Evidence(s, f"{rng.randrange(4):02x}")
                        for s in rng.sample(VALUE_SIGNALS, rng.randint(0, 3))]
            if rng.random() < 0.2:
                evidence.append(Evidence("org", f"{rng.randrange(2):02x}"))
            if rng.random() < 0.05:
                evidence.append(Evidence("prompt_similarity", "ff"))   # ignored by both
            pairs = [PairEvidence(account, rng.choice(ACCOUNTS),
                                  rng.choice(["attribute:payment", "ip:/24", "co_activity"]))
                     for _ in range(rng.randint(0, 2) if rng.random() < 0.2 else 0)]
            g.record(account, evidence, now)
            g.record_pairs(pairs, now)
            assert g.cluster(account) == await r.record(account, evidence, now, pairs), where
        elif op < 0.87:
            pairs = [PairEvidence(rng.choice(ACCOUNTS), rng.choice(ACCOUNTS),
                                  # value signals too: co-held hot values (cohort)
                                  rng.choice(["prompt_similarity", "co_activity",
                                              "attribute:payment", "ip:/24", "org"]))
                     for _ in range(rng.randint(1, 3))]
            g.record_pairs(pairs, now)
            await r.record_pairs(pairs, now)
        elif op < 0.93:
            account, flag = rng.choice(ACCOUNTS), rng.random() < 0.6
            g.block(account, flag)
            await r.block(account, flag)
        else:
            g.rebuild(now)
            await r.rebuild(now)
        both.same_events(where)
        for kind, _ in both.events[0]:
            seen[kind] += 1
        seen["blocked"] += sum(g.cluster(a).linked_to_blocked for a in ACCOUNTS)
        if step % 10 == 0 or op >= 0.93:
            await both.same_everywhere(ACCOUNTS, where)
    await both.same_everywhere(ACCOUNTS, f"seed {seed} end")


async def test_the_events_agree_and_the_sequences_reach_every_case(
        aclient: tuple[Any, str]) -> None:
    """The random sequences above make links, merges, hot values, blocked links."""
    client, prefix = aclient
    rng = random.Random(99)
    both = Both(client, prefix, SETTINGS)
    kinds: dict[str, int] = {}
    now = 1_764_460_800.0
    for step in range(400):
        now += rng.expovariate(1 / 5)
        account = rng.choice(ACCOUNTS)
        evidence = [Evidence(s, f"{rng.randrange(4):02x}")
                    for s in rng.sample(VALUE_SIGNALS, rng.randint(0, 3))]
        both.graph.record(account, evidence, now)
        await both.store.record(account, evidence, now)
        for kind, _ in both.events[0]:
            kinds[kind] = kinds.get(kind, 0) + 1
        both.same_events(f"step {step}")
    assert kinds.get("link", 0) > 10 and kinds.get("merge", 0) > 5 and kinds.get("hot", 0) > 3


async def test_a_hot_value_keeps_its_most_recent_sightings(aclient: tuple[Any, str]) -> None:
    """Beyond max(fanout + 1, 64) sightings the oldest go, as in the reference."""
    client, prefix = aclient
    both = Both(client, prefix, SETTINGS)
    accounts = [f"acct-{i:03d}" for i in range(90)]
    now = 1_764_460_800.0
    card = Evidence("attribute:payment", "aa")
    for i, account in enumerate(accounts * 2):
        now += 1.0
        extra = [Evidence("ip:exact", f"{i % 7:02x}")]
        assert both.graph.record(account, [card, *extra], now) == \
            await both.store.record(account, [card, *extra], now)
        both.same_events(f"sighting {i}")
    hot = (await both.store.graph()).hot_values[0]
    assert (hot.signal, hot.accounts) == ("attribute:payment", 64)
    await both.same_everywhere(accounts[:10] + accounts[-10:], "hot")
    now += 98.0   # all but the last three sightings expire: the card cools down
    both.graph.rebuild(now)
    await both.store.rebuild(now)
    await both.same_everywhere(accounts[:10] + accounts[-10:], "rebuilt")
    assert not (await both.store.graph()).hot_values
    assert await both.store.members(accounts[-1]) == accounts[-3:]


async def test_rebuild_if_due_runs_once_per_half_period(aclient: tuple[Any, str]) -> None:
    client, prefix = aclient
    first = RedisLinkageStore(client, prefix, SETTINGS)
    second = RedisLinkageStore(client, prefix, SETTINGS)   # another replica
    now = 1_764_460_800.0
    assert await first.rebuild_if_due(now)
    assert not await second.rebuild_if_due(now + 10)
    assert await second.rebuild_if_due(now + 25)


def test_no_raw_value_reaches_redis(tmp_path: Path, redis_prefix: tuple[str, str],
                                    fake: str) -> None:
    url, prefix = redis_prefix
    policy = linkage_policy(tmp_path, "rules: []\n", linkage="""
linkage:
  secret: linkage-test-secret-0123456789
  signals:
    - {attribute: payment, weight: 1.0}
    - {ip: exact, weight: 0.5}
    - {header: x-device-id, weight: 0.6}
""", upstream=fake, state=url, key_prefix=prefix)
    with running_server(create_app(policy)) as proxy_url:
        for key in ("key-alice", "key-carol"):
            request = chat(key)
            request["headers"] |= {"x-device-id": "device-XYZZY",
                                   "x-forwarded-for": "198.51.100.77"}
            assert httpx.post(proxy_url + CHAT, timeout=10, **request).status_code == 200
    plain: Any = redis.Redis.from_url(url)
    dump = b""
    for key in plain.scan_iter(match=f"*{prefix}*"):
        dump += key + plain.dump(key) + b"\n"
        kind = plain.type(key)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in plain.hgetall(key).items())
        elif kind == b"set":
            dump += b"".join(plain.smembers(key))
    assert b":linkage:" in dump and b"alice" in dump, "the graph is there"
    for raw in (b"card-1", b"device-XYZZY", b"198.51.100", b"127.0.0.1", b"org-alice"):
        assert raw not in dump, raw


@pytest.mark.parametrize(("rules", "expected"), [
    ("  - name: size\n    linkage: {max_accounts: 5}\n", ["EVALSHA"]),
    # record and reserve (one admission call), settle; and carol's link to alice merges
    # two clusters: their usage carry is one more call, in the background (linkage.carry)
    ("  - name: tokens\n    budget: 100000/day\n    per: cluster\n", ["EVALSHA"] * 3),
], ids=["linkage-only", "with-cluster-budget"])
def test_one_round_trip_per_record(tmp_path: Path, redis_prefix: tuple[str, str], fake: str,
                                   rules: str, expected: list[str]) -> None:
    """Recording the evidence and reading the cluster is one EVALSHA; a cluster budget
    adds its usual reserve and settle, nothing more."""
    url, prefix = redis_prefix
    policy = linkage_policy(tmp_path, "rules:\n" + rules, upstream=fake, state=url,
                            key_prefix=prefix)
    with running_server(create_app(policy)) as proxy_url:
        assert httpx.post(proxy_url + CHAT, timeout=10, **chat("key-alice")).status_code \
            == 200   # warm-up: loads the scripts
        with monitored(url, prefix) as commands:
            assert httpx.post(proxy_url + CHAT, timeout=10, **chat("key-carol")).status_code \
                == 200
    assert names(commands) == expected, commands


BUDGET = """
rules:
  - name: tokens
    budget: 300/day
    per: cluster
"""


def test_two_proxy_processes_enforce_one_cluster_budget(tmp_path: Path,
                                                        redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    policy = linkage_policy(tmp_path, BUDGET, state=url, key_prefix=prefix)
    with fake_model() as upstream, proxy(policy, upstream) as a, proxy(policy, upstream) as b:
        def spend(keys: list[str]) -> int:
            for i in range(200):
                r = httpx.post((a, b)[i % 2] + CHAT, timeout=10, **chat(keys[i % len(keys)]))
                if r.status_code == 429:
                    return i
                assert r.status_code == 200, r.text
            raise AssertionError("the budget never ran out")

        alone = spend(["key-dave"])
        # alice on one process, carol and frank on the other: one budget between them
        together = spend(["key-alice", "key-carol", "key-frank"])
        after = [httpx.post(proxy_url + CHAT, timeout=10, **chat(key)).status_code
                 for proxy_url, key in ((a, "key-carol"), (b, "key-alice"), (a, "key-erin"))]
    assert together == alone >= 3
    assert after == [429, 429, 200]


async def test_redis_cluster_shares_clusters_and_budgets(tmp_path: Path) -> None:
    with redis_cluster(tmp_path) as uri:
        policy = linkage_policy(tmp_path, BUDGET.replace("300/day", "2000/day") +
                                "    default_max_tokens: 100\n", state=uri,
                                key_prefix="gplink")
        apps = [GuardMiddleware(usage_app, policy) for _ in range(2)]

        async def post(i: int, key: str) -> int:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[i % 2]),
                                         base_url="http://p") as c:
                return (await c.post(CHAT, **chat(key, max_tokens=100))).status_code

        async def spend(keys: list[str]) -> int:
            for i in range(100):
                if await post(i, keys[i % len(keys)]) == 429:
                    return i
            raise AssertionError("the budget never ran out")

        alone = await spend(["key-dave"])
        together = await spend(["key-alice", "key-carol"])
        erin = await post(1, "key-erin")
        assert apps[0].linkage is not None and apps[1].linkage is not None
        cluster = await apps[1].linkage.store.cluster("carol")
        for app in apps:
            await app.linkage.aclose()   # type: ignore[union-attr]
            await app.state.aclose()
    assert together == alone >= 3
    assert (erin, cluster.id, cluster.size) == (200, "alice", 2)
