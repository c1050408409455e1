"""Usage follows a cluster across merges: what a ``per: cluster`` rule counted under the
id that disappears is added to the surviving id.

A cluster's id is its smallest member, so when two clusters merge the one with the
larger id takes the other's id, and without a carry its ``per: cluster`` budgets and
quotas would start again from zero under the new key: a hydra linked one account at a
time would get a fresh budget at every merge.

    feed = MergeFeed()                                    # the linkage store's on_event
    store = MemoryLinkageStore(settings, on_event=feed)   # or RedisLinkageStore
    feed.on_merge = usage_carry(pipeline.guards, state.budgets)   # None: no such rule
    task = loop.create_task(feed.run())                   # the linkage enricher does this

Where merges happen and how they reach the carry:

- ``record`` (request path) and ``record_pairs`` (background): the store's ``merge``
  event names the id that disappeared (``absorbed``) and the one it joined
  (``cluster``). ``MergeFeed`` (the store's ``on_event``) logs it as ``log_event`` does
  and queues it; its background task hands the queued merges, in order, to
  ``on_merge`` as ONE batch: one budget-store call per batch, never on the request path.
  Each batch is handed over once more ``again_after`` seconds later (``wire``: the
  longest budget lease of the rules): a merge found in the background (prompt
  similarity, co-activity) lands while the request that completed it is still in flight,
  reserved under the old id, and its settle is carried then (the budget carry adds only
  what grew since; a quota carry adds nothing the second time).
- ``rebuild`` (clusters recomputed from live evidence): the enricher reads every
  clustered account's id before and after (``cluster_ids``: in process for
  ``memory://``; one script reading two hashes on Redis, O(clustered accounts), on every
  replica at each scheduled attempt, since it cannot know beforehand whether it will
  rebuild) and reports each (old id -> new id) that changed. A cluster that *splits*
  thereby hands its whole current usage to the part that gets a new id as well as
  keeping it under the old id: stricter than exact, but a link expiring never resets a
  budget.

What is carried (``UsageCarry``): for every rule whose ``per`` is exactly ``cluster``,
budgets (``BudgetStore.carry``: the used tokens of every current window, idempotent;
reservations in flight under the old id settle there and are carried by the second
pass, unless they outlive it: a stream renewed past its lease) and quotas
(``QuotaGuard.carry``: fixed and sliding windows; moving windows are not). Rules that
combine ``cluster`` with other keys (``per: [cluster, model]``) are not carried: their
other parts are not known from the merge. The carry adds and never moves: the absorbed
id keeps its counts, which matter again only if the cluster splits.

A carry that fails (store unavailable) is logged and counted, not retried; the budgets
then count as they did before this module (from the surviving id's own counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import RedisError

from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards.base import Guard
from guardproxy.guards.budget import BudgetGuard
from guardproxy.guards.per import CLUSTER
from guardproxy.guards.quota import QuotaGuard
from guardproxy.linkage.api import Cluster, LinkageStore
from guardproxy.linkage.events import log_event
from guardproxy.linkage.memory import MemoryLinkageStore
from guardproxy.linkage.redis import RedisLinkageStore
from guardproxy.state.budgets import BudgetStore, Carry

log = logging.getLogger("guardproxy.linkage")

MAX_PENDING = 100_000   # merges waiting for the carry; beyond, dropped and counted


@dataclass(frozen=True, slots=True)
class Merge:
    absorbed: str    # the cluster id that disappeared
    cluster: str     # the id its accounts have now


OnMerge = Callable[[Sequence[Merge]], Awaitable[None]]


@dataclass(slots=True)
class CarryCounters:
    """For metrics: monotonic counts since start."""

    merges: int = 0     # merges handed to on_merge (second passes included)
    batches: int = 0    # on_merge calls that succeeded (second passes included)
    errors: int = 0     # on_merge calls that failed (their merges are not carried)
    dropped: int = 0    # merges dropped because too many were waiting


class MergeFeed:
    """A linkage store's ``on_event``: logs every event (``graph.log_event``) and, while
    ``on_merge`` is set, queues merges for ``run``, the background task that hands them
    to ``on_merge`` in batches, and again ``again_after`` seconds later (None: once).
    Hearing an event costs the request path a list append. ``clock``: monotonic
    seconds (injectable for tests)."""

    def __init__(self, on_merge: OnMerge | None = None, *,
                 again_after: float | None = None, max_pending: int = MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_merge = on_merge
        self.again_after = again_after
        self.max_pending = max_pending
        self.clock = clock
        self.pending: list[Merge] = []
        self.later: deque[tuple[float, list[Merge]]] = deque()   # (when, batch) to repeat
        self.counters = CarryCounters()
        self._wake: asyncio.Event | None = None    # pending merges: the task runs
        self._quiet: asyncio.Event | None = None   # nothing pending nor being carried
        self._running = False

    def wire(self, carry: UsageCarry | None) -> None:
        """Hand merges to ``carry`` (None: to nothing), again after its longest lease."""
        self.on_merge = carry
        self.again_after = carry.again_after if carry is not None else None

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        log_event(kind, fields)
        absorbed = fields.get("absorbed")
        if kind == "merge" and absorbed is not None:
            self.add([Merge(str(absorbed), str(fields["cluster"]))])

    def add(self, merges: Iterable[Merge]) -> None:
        """Queue merges for the carry (dropped, and counted, while none is wired)."""
        if self.on_merge is None:
            return
        for merge in merges:
            if len(self.pending) >= self.max_pending:
                self.counters.dropped += 1
                continue
            self.pending.append(merge)
        if self.pending:
            self.poke()

    def poke(self) -> None:
        """Make the task look at its queue and schedule now (tests move ``clock``)."""
        if self._wake is not None and self._quiet is not None:
            self._quiet.clear()
            self._wake.set()

    async def run(self) -> None:
        """Carry queued merges until cancelled (the linkage enricher's task)."""
        # events are bound to this task's loop: made anew at each start
        self._wake, self._quiet = wake, quiet = asyncio.Event(), asyncio.Event()
        self._running = True
        try:
            while True:
                if self.pending:
                    batch, self.pending = self.pending, []
                    await self._carry(batch)
                    if self.again_after is not None and len(self.later) < self.max_pending:
                        self.later.append((self.clock() + self.again_after, batch))
                    continue
                if self.later and self.later[0][0] <= self.clock():
                    await self._carry(self.later.popleft()[1])
                    continue
                quiet.set()
                wake.clear()
                wait = self.later[0][0] - self.clock() if self.later else None
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
                # that lands as the event is set, and shutdown would wait on this task
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()
        finally:
            self._running = False
            quiet.set()

    async def _carry(self, batch: list[Merge]) -> None:
        on_merge = self.on_merge
        if on_merge is None:
            return
        try:
            await on_merge(batch)
        except StoreError as exc:
            self.counters.errors += 1
            log.warning("cluster usage not carried across %d merges: %s", len(batch), exc)
        except Exception:  # a bug must not stop the task: the next batch is tried
            self.counters.errors += 1
            log.exception("cluster usage carry failed")
        else:
            self.counters.merges += len(batch)
            self.counters.batches += 1

    async def idle(self) -> None:
        """Wait until every queued merge, and every second pass now due, has been
        carried (tests): returns at once when the task is not running."""
        await asyncio.sleep(0)   # a task created but not yet started gets to start
        if self._running and self._quiet is not None:
            await self._quiet.wait()

    # -- rebuilds ----------------------------------------------------------------
    async def before_rebuild(self, store: LinkageStore) -> dict[str, str] | None:
        """The clustered accounts' ids before a rebuild; None when nothing is carried."""
        if self.on_merge is None:
            return None
        try:
            return await cluster_ids(store)
        except StoreError as exc:
            log.warning("cluster ids not read before the rebuild (usage not carried): %s",
                        exc)
            return None

    async def after_rebuild(self, store: LinkageStore, before: dict[str, str] | None) -> None:
        """Queue every id that the rebuild changed, as a merge (old id -> new id)."""
        if before is None:
            return
        after = await self.before_rebuild(store)
        if after is not None:
            self.add(id_changes(before, after))


# -- what a merge carries ----------------------------------------------------------
def _cluster_key(key: Callable[[Exchange], str], cluster_id: str) -> str:
    """The counter key a ``per: cluster`` rule gives a request of ``cluster_id``: the
    rule's own key function, so the escaping is the one requests get."""
    stub = Exchange("POST", "", {}, "", notes={CLUSTER: Cluster(cluster_id, 2)})
    return key(stub)


class UsageCarry:
    """``on_merge`` for the ``per: cluster`` rules of one pipeline (see the module
    docstring): one budget-store call per batch, then each quota rule's carry."""

    def __init__(self, budgets: Sequence[BudgetGuard], quotas: Sequence[QuotaGuard],
                 store: BudgetStore) -> None:
        self.budgets = tuple(budgets)
        self.quotas = tuple(quotas)
        self.store = store
        # seconds after which a reservation made before a merge has settled (or expired)
        self.again_after = max((g.ttl for g in self.budgets), default=None)

    async def __call__(self, merges: Sequence[Merge]) -> None:
        carries = [Carry(g.subject(_cluster_key(g.key, m.absorbed)),
                         g.subject(_cluster_key(g.key, m.cluster)), g.settings.windows)
                   for m in merges for g in self.budgets]
        failed: StoreError | None = None
        if carries:
            try:
                await self.store.carry(carries)
            except StoreError as exc:
                failed = exc
        for quota in self.quotas:
            try:
                await quota.carry([(_cluster_key(quota.key, m.absorbed),
                                    _cluster_key(quota.key, m.cluster)) for m in merges])
            except StoreError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


def usage_carry(guards: Iterable[Guard], store: BudgetStore) -> UsageCarry | None:
    """The carry for a pipeline's guards; None when no rule counts ``per: cluster``."""
    budgets: list[BudgetGuard] = []
    quotas: list[QuotaGuard] = []
    for guard in guards:
        if isinstance(guard, BudgetGuard) and guard.rule.per == ("cluster",):
            budgets.append(guard)
        elif isinstance(guard, QuotaGuard) and guard.rule.per == ("cluster",):
            quotas.append(guard)
    return UsageCarry(budgets, quotas, store) if budgets or quotas else None


# -- cluster ids around a rebuild ----------------------------------------------------
async def cluster_ids(store: LinkageStore) -> dict[str, str] | None:
    """Every account in a cluster of 2+ -> its cluster id (accounts alone are their own
    id); None for a store of another kind. Raises ``StoreError``."""
    if isinstance(store, MemoryLinkageStore):
        return {m: root for root, members in store.graph_engine.clusters.group.items()
                for m in members}
    if isinstance(store, RedisLinkageStore):
        script = store.client.register_script(_script("linkage_common.lua",
                                                      "linkage_carry_ids.lua"))
        try:
            # the common header's arguments, as the store passes them (they are unused)
            flat = await script(keys=[store.base], args=store.args(0.0))
        except RedisError as exc:
            raise StoreError(f"linkage store unavailable: {exc}") from exc
        text = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                for v in flat]
        return dict(zip(text[::2], text[1::2], strict=True))
    return None


def id_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[Merge]:
    """(old id -> new id) for every id a rebuild changed, ordered so that an id is read
    as a source before it is added to as a target (a cycle is broken anywhere)."""
    pending = sorted({(before.get(a, a), after.get(a, a)) for a in {*before, *after}
                      if before.get(a, a) != after.get(a, a)})
    out: list[Merge] = []
    while pending:
        sources = {old for old, _ in pending}
        ready = [c for c in pending if c[1] not in sources] or pending[:1]
        out += [Merge(old, new) for old, new in ready]
        pending = [c for c in pending if c not in ready]
    return out


def _script(*names: str) -> str:
    return "\n".join(resources.files("guardproxy.state").joinpath(f"lua/{name}")
                     .read_text("utf-8") for name in names)
