"""A settle that fails while the store is down is queued, retried and lands once the store
is back; never dropped silently, never charged twice.

The store really fails and recovers: a private redis-server is reached through a TCP
forwarder (``Gate``) on its own loopback port. Closing the gate refuses new connections
and cuts open ones, as a network partition or a store restart does, while the server
keeps its data; reopening it on the same port lets the client reconnect. The ambiguous
failure (the store ran the settle but the reply was lost) is real too: the server is
frozen with SIGSTOP, the client times out after sending, and on SIGCONT the server runs
every settle it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from guardproxy.errors import StoreError
from guardproxy.state import open_state
from guardproxy.state.budgets import MemoryBudgetStore, Window
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.retry import SettleRetry
from tests.procs import free_port
from tests.redis_topologies import _base, _need_redis_server, _wait

DAY = Window(limit=1000, seconds=86400)


@dataclass(frozen=True)
class Private:
    pid: int
    port: int


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Private]:
    """A redis-server of our own on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(_base(_need_redis_server(), port), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: redis.Redis(port=port).ping(), "private redis")
        yield Private(proc.pid, port)
    finally:
        os.kill(proc.pid, signal.SIGCONT)   # in case a test left it frozen
        proc.terminate()
        proc.wait(timeout=10)


class Gate:
    """A TCP forwarder from a loopback port of its own to the private Redis."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.WriteTransport] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.transports.add(writer.transport)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            self.transports.add(up_writer.transport)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            writer.transport.abort()
        finally:
            self.tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()
        self.transports.clear()
        await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()


def _client(port: int, timeout: float | None = None) -> aioredis.Redis:
    # no redis-py retries: every failure reaches the store's caller at once
    return aioredis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_timeout=timeout,
                          socket_connect_timeout=2)


async def _until(check: Callable[[], bool], what: str) -> None:
    """Wait for a condition; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + 20.0
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after 20s")
        await asyncio.sleep(0.02)


async def test_settle_queued_while_store_is_down_lands_when_it_is_back(
        private_redis: Private) -> None:
    gate = Gate(private_redis.port)
    await gate.open()
    attempts = []

    class CountingStore(RedisBudgetStore):
        async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
            attempts.append(lease_id)
            return await super().settle(subject, lease_id, actual)

    store = CountingStore(_client(gate.port), "gp")
    direct = RedisBudgetStore(_client(private_redis.port), "gp")  # bypasses the gate
    settles = SettleRetry(base_delay=0.02, max_delay=0.2)
    try:
        lease = await store.reserve("alice", (DAY,), 300, ttl=600)
        assert lease.lease_id
        await gate.close()                               # the store goes away
        assert await settles.settle(store, "alice", lease.lease_id, 120) is None
        assert (settles.pending, settles.queued, settles.dropped) == (1, 1, 0)
        await _until(lambda: len(attempts) >= 4, "retries while the store is down")
        (day,) = await direct.usage("alice", (DAY,))
        assert (day.used, day.reserved) == (0, 300), "nothing landed while it was down"
        assert settles.pending == 1 and settles.retried == 0
        await gate.open()                                # ...and comes back
        await _until(lambda: settles.pending == 0, "queued settle landing")
        (day,) = await direct.usage("alice", (DAY,))
        assert (day.used, day.reserved) == (120, 0)
        assert (settles.retried, settles.dropped) == (1, 0)
    finally:
        await settles.aclose()
        await gate.close()
        await store.aclose()
        await direct.aclose()


def _script_runs(client: redis.Redis) -> int:
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return int(stats["calls"]) - int(stats.get("failed_calls", 0))


def _frozen(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


async def test_retry_after_an_ambiguous_failure_never_charges_twice(
        private_redis: Private) -> None:
    port = private_redis.port
    store = RedisBudgetStore(_client(port, timeout=0.3), "gp")
    direct = redis.Redis(port=port)
    settles = SettleRetry(base_delay=0.02, max_delay=0.1)
    try:
        lease = await store.reserve("bob", (DAY,), 300, ttl=600)
        assert lease.lease_id
        # the settle script is loaded, so a frozen EVALSHA runs rather than NOSCRIPT
        assert not await store.settle("bob", "unknown-lease", 1)
        before = _script_runs(direct)
        os.kill(private_redis.pid, signal.SIGSTOP)
        await _until(lambda: _frozen(private_redis.pid), "server frozen")
        # the settle is sent, the server will run it, but the reply never comes in time
        assert await settles.settle(store, "bob", lease.lease_id, 120) is None
        await asyncio.sleep(0.5)                          # a retry or two time out too
        os.kill(private_redis.pid, signal.SIGCONT)
        await _until(lambda: settles.pending == 0, "queued settle landing")
        assert _script_runs(direct) - before >= 2, "the timed-out settle and a retry ran"
        (day,) = await store.usage("bob", (DAY,))
        assert (day.used, day.reserved) == (120, 0), "charged exactly once"
        assert (settles.retried, settles.dropped) == (1, 0)
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)
        await settles.aclose()
        await store.aclose()
        direct.close()


class FlakyStore(MemoryBudgetStore):
    """A memory store whose settles fail while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        if self.down:
            raise StoreError("store down")
        return await super().settle(subject, lease_id, actual)


async def test_full_queue_drops_the_oldest_and_counts_it(
        caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    leases = [(await store.reserve("carol", (DAY,), 10, ttl=600)).lease_id for _ in range(5)]
    settles = SettleRetry(max_pending=3, base_delay=0.01, max_delay=0.02)
    with caplog.at_level(logging.WARNING, logger="guardproxy.state"):
        for lease_id in leases:
            assert lease_id and await settles.settle(store, "carol", lease_id, 7) is None
    assert (settles.queued, settles.dropped) == (5, 2)
    assert settles.pending == 3
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 2
    store.down = False
    await _until(lambda: settles.pending == 0, "queue drained")
    assert settles.retried == 3
    (day,) = await store.usage("carol", (DAY,))
    # the two oldest settles were lost: their leases stay reserved until they expire
    assert (day.used, day.reserved) == (21, 20)
    assert {lid for lid in leases if lid in store.leases} == set(leases[:2])
    await settles.aclose()


async def test_settle_that_succeeds_is_not_queued() -> None:
    store = MemoryBudgetStore()
    lease = await store.reserve("dave", (DAY,), 10, ttl=600)
    settles = SettleRetry()
    assert lease.lease_id
    assert await settles.settle(store, "dave", lease.lease_id, 5) is True
    assert await settles.settle(store, "dave", lease.lease_id, 5) is False  # idempotent
    assert (settles.pending, settles.queued, settles.retried, settles.dropped) == (0, 0, 0, 0)
    await settles.aclose()


async def test_aclose_tries_once_more_then_counts_what_is_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    a = await store.reserve("erin", (DAY,), 10, ttl=600)
    b = await store.reserve("erin", (DAY,), 10, ttl=600)
    settles = SettleRetry(base_delay=10, max_delay=10)  # no retry before aclose
    assert a.lease_id and b.lease_id
    await settles.settle(store, "erin", a.lease_id, 3)
    await asyncio.sleep(0)                                 # the retry task fails once
    store.down = False
    await settles.aclose()                                 # the store is back: it lands
    assert (settles.pending, settles.retried, settles.dropped) == (0, 1, 0)
    store.down = True
    closed = SettleRetry(base_delay=10, max_delay=10)
    await closed.settle(store, "erin", b.lease_id, 3)
    with caplog.at_level(logging.WARNING, logger="guardproxy.state"):
        await closed.aclose()                              # still down: lost, and counted
        assert (closed.pending, closed.dropped) == (0, 1)
        # after aclose nothing is queued any more: a failure is counted at once
        assert await closed.settle(store, "erin", b.lease_id, 3) is None
        assert (closed.pending, closed.dropped) == (0, 2)
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 2
    (day,) = await store.usage("erin", (DAY,))
    assert (day.used, day.reserved) == (3, 10)


async def test_state_has_a_settle_retry_closed_with_it() -> None:
    state = open_state("memory://")
    assert isinstance(state.settles, SettleRetry)
    await state.aclose()
    assert state.settles._closed
