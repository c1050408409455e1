"""Settles that failed (the store was down for a moment) are retried, never dropped silently.

    settles = SettleRetry()
    await settles.settle(store, subject, lease_id, actual)   # tries once; on StoreError queues
    await settles.settle_many([PendingSettle(store, subject, lease_id, actual), ...])
    ...
    await settles.aclose()                                    # stops the retry task

A failed settle goes into a bounded queue (oldest first). One background task, started
lazily on the running loop when something is queued, retries the oldest entry with capped
exponential backoff and jitter until it lands, then the next. Retrying is safe because a
settle is idempotent by lease id: after an ambiguous failure (the store ran it but the
reply was lost) the retry finds the lease gone and charges nothing.

Until it lands, a queued settle's reservation is held by its lease, and reclaimed when
the lease expires; a settle that lands after that still charges the real usage (the
store remembers expired leases for ``budgets.GRACE`` seconds).

Counters, for metrics: ``pending`` (queued or being retried now), ``queued`` (ever
queued), ``retried`` (landed on a retry), ``dropped`` (lost: the queue was full, or
still pending at ``aclose``; each is logged as a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from guardproxy.errors import StoreError
from guardproxy.state.budgets import BudgetStore, Settle

log = logging.getLogger("guardproxy.state")

MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class PendingSettle:
    store: BudgetStore
    subject: str
    lease_id: str
    actual: int


class SettleRetry:
    """A bounded queue of failed settles and the task that retries them.

    ``base_delay`` and ``max_delay`` (seconds) bound the backoff between failed retries:
    ``min(max_delay, base_delay * 2**failures)``, times a random factor in [0.5, 1].
    """

    def __init__(self, max_pending: int = MAX_PENDING, base_delay: float = 0.05,
                 max_delay: float = 5.0) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.queue: deque[PendingSettle] = deque()
        self.queued = 0
        self.retried = 0
        self.dropped = 0
        self._current: PendingSettle | None = None  # taken off the queue, being retried
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self.queue) + (self._current is not None)

    async def settle(self, store: BudgetStore, subject: str, lease_id: str,
                     actual: int) -> bool | None:
        """Settle now: True if this call charged the lease, False if it was already
        settled; None if the store failed and the settle was queued for retrying."""
        try:
            return await store.settle(subject, lease_id, actual)
        except StoreError as exc:
            self._enqueue(PendingSettle(store, subject, lease_id, actual), exc)
            return None

    async def settle_many(self, entries: Sequence[PendingSettle]) -> list[bool | None]:
        """Settle all of ``entries`` now, in one ``settle_many`` call per store (one
        request's leases: one round trip). Per entry as ``settle``: True, False, or None
        if its store failed; then each of that store's entries is queued on its own
        (retrying one that did land charges nothing: settles are idempotent)."""
        groups: dict[int, list[int]] = {}   # id(store) -> indexes into entries
        for n, entry in enumerate(entries):
            groups.setdefault(id(entry.store), []).append(n)
        out: list[bool | None] = [None] * len(entries)
        for part in groups.values():
            store = entries[part[0]].store
            try:
                charged = await store.settle_many(
                    [Settle(entries[n].subject, entries[n].lease_id, entries[n].actual)
                     for n in part])
            except StoreError as exc:
                for n in part:
                    self._enqueue(entries[n], exc)
                continue
            for n, result in zip(part, charged, strict=True):
                out[n] = result
        return out

    def later(self, entries: Sequence[PendingSettle], why: Exception) -> None:
        """Queue ``entries`` for the retry task without trying them now (the store just
        failed: the caller must not wait on it)."""
        for entry in entries:
            self._enqueue(entry, why)

    def _enqueue(self, entry: PendingSettle, exc: Exception) -> None:
        if self._closed:
            self._drop(entry, "the settle queue is closed")
            return
        if len(self.queue) >= self.max_pending:
            self._drop(self.queue.popleft(), f"the settle queue is full ({self.max_pending})")
        self.queue.append(entry)
        self.queued += 1
        log.info("settle of lease %s (%s) failed, queued for retry: %s",
                 entry.lease_id, entry.subject, exc)
        loop = asyncio.get_running_loop()
        # a task of another (closed) loop never runs again: start one on this loop
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    def _drop(self, entry: PendingSettle, why: str) -> None:
        self.dropped += 1
        log.warning("settle of lease %s (%s, %d tokens) dropped: %s; its reservation is "
                    "reclaimed when the lease expires", entry.lease_id, entry.subject,
                    entry.actual, why)

    def _delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures, 32)) \
            * random.uniform(0.5, 1.0)

    async def _run(self) -> None:
        if self._current is not None:  # left by a task whose loop was closed under it
            self.queue.appendleft(self._current)
            self._current = None
        failures = 0
        while self.queue:
            entry = self._current = self.queue.popleft()
            try:
                await entry.store.settle(entry.subject, entry.lease_id, entry.actual)
            except StoreError:
                # back at the head, unless the queue filled meanwhile: then it is the oldest
                self._current = None
                if len(self.queue) >= self.max_pending:
                    self._drop(entry, f"the settle queue is full ({self.max_pending})")
                else:
                    self.queue.appendleft(entry)
                failures += 1
                await asyncio.sleep(self._delay(failures))
                continue
            self._current = None
            self.retried += 1
            failures = 0

    async def aclose(self) -> None:
        """Stop retrying. What is still pending is tried once more, in order, until the
        first failure; the rest is counted in ``dropped`` and logged."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._current is not None:
            self.queue.appendleft(self._current)
            self._current = None
        while self.queue:
            entry = self.queue[0]
            try:
                await entry.store.settle(entry.subject, entry.lease_id, entry.actual)
            except StoreError:
                break
            self.queue.popleft()
            self.retried += 1
        while self.queue:
            self._drop(self.queue.popleft(), "shutting down while the store is unavailable")
