"""Attacks on batched admission (issue 12): a hostile client, a misbehaving store, a
new operator, against ``Pipeline.admit`` and the ``AdmissionStore``s.

Each test states what must hold. Written by a fresh review before the fixes: eleven
failed then (a clamped cap lost across Cluster slots, resends counted twice, stores
failing mid-call keeping leases, a window given twice in other units counted twice, a
NUL model name taken for the cluster placeholder, rate headers of the request that
opens a window, a shutdown hang); all hold now. The rest were attacks that held.

Topologies: ``memory://``, one Redis (``redis_prefix``), and a private Redis Cluster
(``tests/redis_topologies.py``; one per module, a key prefix per test). A misbehaving
store is a loopback TCP relay (``Relay``) that forwards to Redis and can lose the reply
to the next EVALSHA, or a key of the wrong type planted in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

import guardproxy.state as state_module
from guardproxy import GuardMiddleware
from guardproxy.errors import PolicyError, StoreError
from guardproxy.linkage.carry import Merge, MergeFeed
from guardproxy.policy.load import load_policy
from guardproxy.state import State, open_state
from guardproxy.state.admission import (
    ALLOWED,
    DENIED,
    SKIPPED,
    BudgetAsk,
    QuotaAsk,
    Refusal,
)
from guardproxy.state.budgets import Settle, Window
from tests.conftest import REDIS_URL, sha, write_policy
from tests.redis_topologies import redis_cluster
from tests.test_budget import usage_app

CHAT = "/v1/chat/completions"


# -- topologies ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as uri:
        yield uri


@pytest.fixture(params=["memory", "redis", "cluster"])
def any_uri(request: pytest.FixtureRequest) -> str:
    """memory://, one Redis, or the module's Redis Cluster (started on first use)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        request.getfixturevalue("redis_prefix")   # skips (or fails in CI) without Redis
        return REDIS_URL
    uri: str = request.getfixturevalue("cluster_uri")
    return uri


def _prefix() -> str:
    return f"gptest-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def proxy(tmp: Path, rules: str, uri: str) -> AsyncIterator[
        tuple[GuardMiddleware, httpx.AsyncClient]]:
    """A proxy in front of ``usage_app`` (answers with completion = max_tokens // 2 and
    echoes what it was sent under ``seen``), on state ``uri`` with a fresh key prefix."""
    app = GuardMiddleware(usage_app, write_policy(tmp, rules, state=uri,
                                                  key_prefix=_prefix()))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://proxy") as client:
            yield app, client
    finally:
        await close(app)


async def close(app: GuardMiddleware) -> None:
    """What the app's lifespan shutdown does: the linkage enricher's tasks, then state.
    The merges carried first: a merge arriving as the enricher closes can keep it open
    (see ``test_the_merge_feed_stops_when_cancelled_as_a_merge_arrives``)."""
    if app.linkage is not None:
        await app.linkage.merges.idle()
        await app.linkage.aclose()
    await app.state.aclose()


def chat(client: httpx.AsyncClient, key: str = "key-alice", **body: Any) -> Any:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post(CHAT, json=payload, headers={"authorization": f"Bearer {key}"})


# -- a store that loses a reply -----------------------------------------------------------


class Relay:
    """A loopback TCP relay to one Redis port. ``lose_next_reply()``: the reply to the
    next command batch that contains EVALSHA is not passed on; the client's connection
    is cut instead (the script ran: the reply was lost on the way back)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.lost = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def lose_next_reply(self) -> None:
        self.armed = True

    async def aclose(self) -> None:
        """Cut every connection; the pumps then end on their own."""
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [cw, sw]
        cut = asyncio.Event()

        async def up() -> None:
            while data := await cr.read(65536):
                if self.armed and b"EVALSHA" in data.upper():
                    self.armed = False
                    cut.set()
                sw.write(data)
                await sw.drain()

        async def down() -> None:
            while data := await sr.read(65536):
                if cut.is_set():
                    self.lost += 1
                    return
                cw.write(data)
                await cw.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cw.transport.abort()
            sw.transport.abort()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.tasks.discard(task)


def _budget(rule: str, subject: str, state: State, *, prompt: int, cap: int,
            limit: int, clamp: bool = False, seconds: int = 3600) -> BudgetAsk:
    return BudgetAsk(rule=rule, shadow=False, subject=(subject,),
                     lease_id=state.budgets.new_lease_id(), generates=True,
                     prompt_weight=1.0, prompt=prompt, completion_weight=1.0, copies=1,
                     cap=cap, clamp=clamp, min_tokens=16,
                     windows=(Window(limit, seconds),), ttl=600.0)


async def _reserved(state: State, ask: BudgetAsk) -> int:
    (window,) = await state.budgets.usage(ask.subject[0], ask.windows)
    return window.reserved


# == 1. a lost reply =======================================================================


async def test_a_lost_reply_leaves_nothing_held(redis_prefix: tuple[str, str]) -> None:
    relay = Relay(int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
    port = await relay.start()
    state = open_state(f"redis://127.0.0.1:{port}/0", redis_prefix[1])
    try:
        quota = QuotaAsk("q", False, "f", ("account=alice",), ((5, 60),))
        budget = _budget("b", "b|account=alice", state, prompt=10, cap=90, limit=1000)
        await state.admission.admit([QuotaAsk("warm", False, "f", ("x",), ((5, 60),))])
        relay.lose_next_reply()
        with pytest.raises(StoreError):
            await state.admission.admit([quota, budget])
        assert relay.lost == 1, "the script ran and its reply was lost"
        for _ in range(100):   # the settle retry queue releases it, off the request path
            if await _reserved(state, budget) == 0:
                break
            await asyncio.sleep(0.05)
        assert await _reserved(state, budget) == 0, "a lease nobody will settle"
        # its quota hit may stay: stricter, never looser (AdmissionStore.admit)
        assert (await state.admission.quota_state(quota)).remaining in ((4,), (5,))
    finally:
        await state.aclose()
        await relay.aclose()


async def test_a_resent_batch_is_judged_as_the_first_send(
        redis_prefix: tuple[str, str]) -> None:
    state = open_state(REDIS_URL, redis_prefix[1])
    try:
        quota = QuotaAsk("q", False, "f", ("account=alice",), ((5, 60),))
        budget = _budget("b", "b|account=alice", state, prompt=40, cap=60, limit=100)
        first = await state.admission.admit([quota, budget])
        assert [r.status for r in first.results] == [ALLOWED, ALLOWED]
        again = await state.admission.admit([quota, budget])   # the same call, resent
        assert [r.status for r in again.results] == [ALLOWED, ALLOWED], \
            "the resend is denied by its own first reservation"
        assert again.results[1].lease_id == budget.lease_id
        assert await _reserved(state, budget) == 100, "reserved once"
        # quota: a single Redis client never resends (redis_from_uri: no retries), so
        # its calls carry no marker; on Cluster they do (the next test)
    finally:
        await state.aclose()


async def test_cluster_client_resend_counts_a_request_once(
        cluster_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = [int(h.rsplit(":", 1)[1]) for h in cluster_uri.split("://")[1].split(",")]
    relays = {p: Relay(p) for p in ports}
    fronts = {p: await relay.start() for p, relay in relays.items()}

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        return ("127.0.0.1", fronts[address[1]]) if address[1] in fronts else address

    # the product's client (redis_client.py), its nodes reached through the relays
    monkeypatch.setattr(state_module, "redis_from_uri", lambda uri: RedisCluster.from_url(
        f"redis://127.0.0.1:{ports[0]}", address_remap=remap))
    state = open_state(cluster_uri, _prefix())
    try:
        quota = QuotaAsk("q", False, "f", ("account=alice",), ((5, 60),))
        await state.admission.admit([quota])   # loads the script on the node
        for relay in relays.values():
            relay.lose_next_reply()
        await state.admission.admit([quota])
        assert sum(r.lost for r in relays.values()) == 1, "one reply was lost"
        assert (await state.admission.quota_state(quota)).remaining == (3,), \
            "two requests, counted once each"
    finally:
        await state.aclose()
        for relay in relays.values():
            await relay.aclose()


# == 2. Redis Cluster: one request, several slots =========================================

CLAMP = """
rules:
  - name: acct-tokens
    budget: 300/day
    per: account
    on_exhausted: clamp
    min_tokens: 16
  - name: org-tokens
    budget: 1000000/day
    per: org
"""


async def test_a_clamped_cap_is_the_cap_forwarded(tmp_path: Path, any_uri: str,
                                                  request: pytest.FixtureRequest) -> None:
    assert key_slot(b"acct-tokens|account=alice") != key_slot(b"org-tokens|org=acme")
    async with proxy(tmp_path, CLAMP, any_uri) as (_, client):
        r = await chat(client, max_tokens=500)
        assert r.status_code == 200
        assert r.json()["seen"]["max_tokens"] < 300, "the upstream is held to the clamp"


BURN = """
rules:
  - name: org-requests
    quota: 3/minute
    per: org
  - name: free-tokens
    when: {tier: free}
    budget: 100/day
    per: account
"""


async def test_requests_denied_later_leave_a_shared_quota_alone(
        tmp_path: Path, any_uri: str) -> None:
    """alice (free) has no budget left: her requests are refused by free-tokens after
    org-requests allowed them. They must not use up her org's quota: bob (pro, same
    org) still gets through. On Cluster the two rules' keys are in different slots."""
    assert key_slot(b"org-requests|org=acme") != key_slot(b"free-tokens|account=alice")
    async with proxy(tmp_path, BURN, any_uri) as (_, client):
        for _ in range(3):
            assert (await chat(client, max_tokens=500)).status_code == 429
        assert (await chat(client, "key-bob", max_tokens=10)).status_code == 200


LINKAGE = """
linkage:
  secret: linkage-test-secret-0123456789
  window: 30d
  signals:
    - {attribute: payment, weight: 1.0, max_fanout: 5}
"""
HYDRA = LINKAGE + """
rules:
  - name: cluster-requests
    quota: 5/minute
    per: cluster
  - name: cluster-tokens
    budget: 100000/day
    per: cluster
  - name: hydra
    linkage: {max_accounts: 2}
"""


@contextlib.asynccontextmanager
async def linked_proxy(tmp: Path, policy: str, uri: str) -> AsyncIterator[
        tuple[GuardMiddleware, httpx.AsyncClient]]:
    """``proxy`` with linkage: alice, carol and frank pay with one card (key-<name>)."""
    path = write_policy(tmp, policy, state=uri, key_prefix=_prefix())
    lines = ["accounts:"]
    for account, org in (("alice", "acme"), ("carol", "acme"), ("frank", "other")):
        lines += [f"  - id: {account}", f"    org: {org}",
                  f"    key_sha256: {sha('key-' + account)}",
                  "    attributes: {payment: card-1}"]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    app = GuardMiddleware(usage_app, path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://proxy") as client:
            yield app, client
    finally:
        await close(app)


async def test_a_gate_denial_counts_nothing_for_the_cluster(tmp_path: Path, any_uri: str) -> None:
    """frank's first request records him into alice's cluster (3 accounts) and the hydra
    rule refuses it, in the batch that also asks the cluster's quota and budget: they
    must count and hold nothing for it."""
    async with linked_proxy(tmp_path, HYDRA, any_uri) as (app, client):
        codes = [(await chat(client, key, max_tokens=50)).status_code
                 for key in ("key-alice", "key-carol", "key-frank")]
        assert codes == [200, 200, 403]
        quota = QuotaAsk("cluster-requests", False, "s", ("cluster=alice",), ((5, 60),))
        assert (await app.state.admission.quota_state(quota)).remaining == (3,)
        (day,) = await app.state.budgets.usage("cluster-tokens|cluster=alice",
                                               (Window(100000, 86400),))
        assert (day.used, day.reserved) == (2 * 35, 0)   # 10 prompt + 25 completion each


async def test_a_failing_slot_leaves_nothing_in_the_others(cluster_uri: str) -> None:
    prefix = _prefix()
    state = open_state(cluster_uri, prefix)
    try:
        quota = QuotaAsk("q", False, "f", ("account=alice",), ((5, 60),))
        good = _budget("good", "good|account=alice", state, prompt=10, cap=90, limit=1000)
        bad = _budget("bad", "bad|org=acme", state, prompt=10, cap=90, limit=1000)
        slots = {key_slot(s.encode()) for s in ("q|account=alice", "good|account=alice",
                                                 "bad|org=acme")}
        assert len(slots) == 3
        # the store misbehaves in one slot: a key of the wrong type (WRONGTYPE)
        await state.redis.set(f"{prefix}:budget:{{bad|org=acme}}:deadlines", "x")
        with pytest.raises(StoreError):
            await state.admission.admit([quota, good, bad])
        assert await _reserved(state, good) == 0
        assert (await state.admission.quota_state(quota)).remaining == (5,)
    finally:
        await state.aclose()


async def test_a_script_error_midway_reserves_nothing(redis_prefix: tuple[str, str]) -> None:
    prefix = redis_prefix[1]
    state = open_state(REDIS_URL, prefix)
    try:
        good = _budget("good", "good|account=alice", state, prompt=10, cap=90, limit=1000)
        bad = _budget("bad", "bad|org=acme", state, prompt=10, cap=90, limit=1000)
        await state.redis.set(f"{prefix}:budget:{{bad|org=acme}}:deadlines", "x")
        with pytest.raises(StoreError):
            await state.admission.admit([good, bad])
        assert await _reserved(state, good) == 0
    finally:
        await state.aclose()


async def test_one_requests_store_error_holds_nothing_for_the_others(
        redis_prefix: tuple[str, str]) -> None:
    prefix = redis_prefix[1]
    state = open_state(REDIS_URL, prefix)
    try:
        quota = QuotaAsk("q", False, "f", ("account=alice",), ((5, 60),))
        alice = _budget("good", "good|account=alice", state, prompt=10, cap=90, limit=1000)
        bob = _budget("bad", "bad|account=bob", state, prompt=10, cap=90, limit=1000)
        await state.redis.set(f"{prefix}:budget:{{bad|account=bob}}:deadlines", "x")
        first, second = await asyncio.gather(state.admission.admit([quota, alice]),
                                             state.admission.admit([bob]),
                                             return_exceptions=True)
        assert isinstance(second, StoreError)
        if isinstance(first, StoreError):   # failed with bob's call: it must hold nothing
            assert await _reserved(state, alice) == 0
            assert (await state.admission.quota_state(quota)).remaining == (5,)
        else:                               # or judged on its own
            assert not isinstance(first, BaseException)
            assert [r.status for r in first.results] == [ALLOWED, ALLOWED]
    finally:
        await state.aclose()


# == 3. a new operator =====================================================================


@pytest.mark.parametrize("rate", ["2/minute; 5/60 seconds", "2/day; 5/24 hours"])
@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_window_written_twice_counts_once(tmp_path: Path, rate: str, where: str,
                                                  request: pytest.FixtureRequest) -> None:
    uri = "memory://"
    if where == "redis":
        request.getfixturevalue("redis_prefix")
        uri = REDIS_URL
    rules = f"rules:\n  - name: r\n    quota: {rate}\n    per: account\n"
    try:
        load_policy(write_policy(tmp_path, rules, state=uri))
    except PolicyError:
        return   # refusing the policy is a fix too
    async with proxy(tmp_path, rules, uri) as (_, client):
        statuses = [(await chat(client, max_tokens=10)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_budget_window_written_twice_charges_once(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    uri = "memory://"
    if where == "redis":
        request.getfixturevalue("redis_prefix")
        uri = REDIS_URL
    rules = "rules:\n  - name: b\n    budget: 300/minute; 1000/60 seconds\n    per: account\n"
    try:
        load_policy(write_policy(tmp_path, rules, state=uri))
    except PolicyError:
        return   # refusing the policy is a fix too
    async with proxy(tmp_path, rules, uri) as (app, client):
        assert (await chat(client, max_tokens=100)).status_code == 200
        (guard,) = app.pipeline.guards
        usage = await app.state.budgets.usage("b|account=alice", guard.rule.settings.windows)
        # usage_app reports 10 prompt + 50 completion tokens
        assert [(w.used, w.reserved) for w in usage] == [(60, 0), (60, 0)]


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_lease_of_1e14_tokens_is_released(where: str,
                                                  request: pytest.FixtureRequest) -> None:
    """An operator's 'unlimited' budget (1e15/month; rates allow up to 2**53) and a
    client asking for 1e14 tokens (a completions request: max_tokens 2**31 - 1, n 128,
    a few hundred prompts). Settled with nothing used, nothing may stay reserved.
    (Lua wrote the lease as 'r:1e+14:…', which no settle could read: fixed in 6d368a3;
    admit.lua is now the only script that reserves.)"""
    uri = "memory://"
    if where == "redis":
        request.getfixturevalue("redis_prefix")
        uri = REDIS_URL
    state = open_state(uri, _prefix())
    try:
        ask = _budget("b", "b|org=acme", state, prompt=0, cap=10**14, limit=10**15,
                      seconds=30 * 86400)
        (result,) = (await state.admission.admit([ask])).results
        assert result.status == ALLOWED and result.lease_id is not None
        assert await state.budgets.settle_many([Settle("b|org=acme", result.lease_id, 0)])
        assert await _reserved(state, ask) == 0
    finally:
        await state.aclose()


# == 4. a hostile client's keys ============================================================

PER_MODEL = """
rules:
  - name: per-model
    quota: 1/minute
    per: model
"""


async def test_a_model_named_nul_has_its_own_counter(tmp_path: Path) -> None:
    async with proxy(tmp_path, PER_MODEL, "memory://") as (_, client):
        # a request that names no model (not a generation endpoint) counts under model=
        other = await client.post("/v1/other", json={"max_tokens": 2},
                                  headers={"authorization": "Bearer key-bob"})
        assert other.status_code == 200
        r = await chat(client, model=json.loads('"\\u0000"'), max_tokens=10)
        assert r.status_code == 200, "counted under another request's key"


FORGE = """
rules:
  - name: per-team
    quota: 1/minute
    per: [model, header:x-team]
"""


async def test_key_parts_cannot_be_forged(tmp_path: Path, any_uri: str) -> None:
    """(model, team) pairs whose values carry the key's separator '|', its escapes, or
    Redis hash-tag braces: each pair counts under its own key. Unescaped, the first two
    pairs would both be 'model=m|header:x-team=t|header:x-team=u'."""
    async def send(client: httpx.AsyncClient, model: str, team: str) -> int:
        r = await client.post(CHAT, json={"model": model, "messages": [], "max_tokens": 5},
                              headers={"authorization": "Bearer key-alice", "x-team": team})
        return int(r.status_code)

    pairs = [("m|header:x-team=t", "u"), ("m", "t|header:x-team=u"),
             ("m%7Cheader:x-team=t", "u"), ("m%257Cheader:x-team=t", "u"),
             ("m", "}"), ("m", "{"), ("m", "{}"), ("m}", "{t"), ("{m|x}", "t"),
             ("m", "t" * 8000), ("m" * 100_000, "t")]
    async with proxy(tmp_path, FORGE, any_uri) as (_, client):
        assert [await send(client, m, t) for m, t in pairs] == [200] * len(pairs)
        assert [await send(client, m, t) for m, t in pairs] == [429] * len(pairs)


async def test_a_nul_in_a_value_is_not_where_the_cluster_id_goes(tmp_path: Path,
                                                                  any_uri: str) -> None:
    """per: [model, cluster] keys are templates split where the cluster id goes (NUL)
    until the batch records the cluster: a NUL inside a client's value is escaped, so
    'a\\x00b' does not become 'a<cluster id>b' (alice's cluster id is 'alice')."""
    rules = LINKAGE + "rules:\n  - name: q\n    quota: 1/minute\n    per: [model, cluster]\n"
    async with linked_proxy(tmp_path, rules, any_uri) as (_, client):
        assert (await chat(client, model="a\x00b", max_tokens=5)).status_code == 200
        assert (await chat(client, model="aaliceb", max_tokens=5)).status_code == 200
        assert (await chat(client, model="a\x00b", max_tokens=5)).status_code == 429


async def test_odd_batches_judge_alike(tmp_path: Path, any_uri: str) -> None:
    """Empty batches, a refusal first, one rule asked twice, a shadow denial before an
    enforced one: every store answers the same and holds nothing of a denied batch."""
    state = open_state(any_uri, _prefix())
    try:
        assert (await state.admission.admit([])).results == []
        quota = QuotaAsk("q", False, "s", ("account=a",), ((2, 60),))
        refused = await state.admission.admit([Refusal("shaping"), quota])
        assert refused.stopped and [r.status for r in refused.results] == [DENIED, SKIPPED]
        twice = await state.admission.admit([quota, quota])
        assert [r.status for r in twice.results] == [ALLOWED, ALLOWED]
        assert (await state.admission.quota_state(quota)).remaining == (0,)
        shadow = QuotaAsk("q", True, "s", ("account=a",), ((2, 60),))
        budget = _budget("b", "b|account=a", state, prompt=10, cap=10, limit=100)
        full = _budget("c", "c|account=a", state, prompt=10, cap=10, limit=5)
        batch = await state.admission.admit([shadow, budget, full])
        assert [r.status for r in batch.results] == [DENIED, ALLOWED, DENIED]
        assert batch.stopped and await _reserved(state, budget) == 0
    finally:
        await state.aclose()


async def test_concurrent_requests_never_exceed_a_quota_or_a_budget(any_uri: str) -> None:
    """40 requests of one account at once (Redis: shared calls; Cluster: the quota and
    the budget in different slots): exactly what the rules allow gets through, and a
    denied request keeps nothing."""
    state = open_state(any_uri, _prefix())
    try:
        quota = QuotaAsk("q", False, "s", ("account=alice",), ((10, 60),))
        budgets = [_budget("b", "b|account=alice", state, prompt=10, cap=90, limit=500)
                   for _ in range(40)]
        assert key_slot(b"q|account=alice") != key_slot(b"b|account=alice")
        batches = await asyncio.gather(*(state.admission.admit([quota, b]) for b in budgets))
        admitted = [b for b in batches if not b.stopped]
        assert len(admitted) == 5, "the budget holds 5 requests of 100 tokens"
        assert (await state.admission.quota_state(quota)).remaining == (5,)
        (window,) = await state.budgets.usage("b|account=alice", budgets[0].windows)
        assert window.reserved == 500
    finally:
        await state.aclose()


# == 5. what the client is told ============================================================

LATER = """
rules:
  - name: requests
    quota: 5/minute
    per: account
  - name: tokens
    budget: 100/day
    per: account
"""


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window"])
async def test_the_request_that_opens_a_window_is_told_when_it_resets(
        tmp_path: Path, strategy: str) -> None:
    rules = f"rules:\n  - name: r\n    quota: 3/minute\n    strategy: {strategy}\n"
    async with proxy(tmp_path, rules, "memory://") as (_, client):
        r = await chat(client, max_tokens=10)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "2"
        assert r.headers["x-ratelimit-reset-requests"] not in ("0s", "0ms")


async def test_rate_headers_of_a_later_denial_say_what_is_left(tmp_path: Path) -> None:
    async with proxy(tmp_path, LATER, "memory://") as (_, client):
        r = await chat(client, max_tokens=500)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        after = await chat(client, max_tokens=10)   # fits: counted
        assert after.status_code == 200
        assert after.headers["x-ratelimit-remaining-requests"] == "4", "the 429 counted nothing"
        assert r.headers["x-ratelimit-remaining-requests"] == "5"


# == 6. the carry across merges ============================================================


async def test_the_merge_feed_stops_when_cancelled_as_a_merge_arrives() -> None:
    feed = MergeFeed()

    async def carry(batch: Sequence[Merge]) -> None:
        return None

    feed.on_merge, feed.again_after = carry, 30.0   # as wire() sets them: a second pass
    task = asyncio.create_task(feed.run())
    feed.add([Merge("carol", "alice")])
    await feed.idle()                    # carried; its second pass is due in 30 s
    feed.add([Merge("frank", "alice")])  # a request's record merged two clusters
    task.cancel()                        # as the enricher closes
    done, _ = await asyncio.wait([task], timeout=2.0)
    try:
        assert done, "the carry task outlived its cancellation"
    finally:
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
