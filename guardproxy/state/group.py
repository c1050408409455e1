"""Group commit: concurrent requests share store calls.

    group = GroupCommit(send)                 # send(items) -> one result per item
    results = await group.submit(items)       # this request's items, results in order

While a call is in flight, what other requests submit waits and goes out together in
the next call, as soon as the one in flight returns: nothing is delayed on purpose, so
a lone request makes its call at once, and under load the calls per request fall with
concurrency (the group commit of database logs; Gray and Reuter, *Transaction
Processing*, 1993, 9.4.7). Each submitter gets its own items' results, or the error of
the call its items went in. The call runs in its own task: a submitter that is
cancelled (its client went away) does not cancel the others' items, nor its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_ITEMS = 512   # items in one call at most: bounds a script's run time on Redis


class GroupCommit(Generic[T, R]):
    """``send(items)`` makes one store call for ``items`` and returns one result per
    item, in order; it raises to fail the whole call."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]],
                 max_items: int = MAX_ITEMS,
                 stopped: Callable[[], Exception] = lambda: RuntimeError("stopped")) -> None:
        self.send = send
        self.max_items = max_items
        self.stopped = stopped   # the error submitters get when the call's task is cancelled
        self.waiting: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        self.task: asyncio.Task[None] | None = None
        self.calls = 0   # store calls made (for tests and benchmarks)

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[R]] = loop.create_future()
        # read by no one when the submitter was cancelled: never "never retrieved"
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.waiting.append((items, done))
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run())
            self.task.add_done_callback(self._ended)
        return await asyncio.shield(done)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before it ever ran never reaches ``_run``'s ``finally``:
        nobody would answer the submitters waiting on it."""
        if task is not self.task or not task.cancelled():
            return
        for _, done in self.waiting:
            if not done.done():
                done.set_exception(self.stopped())
        self.waiting.clear()

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:   # the loop is closing under us: nobody waits forever
            for _, done in self.waiting:
                if not done.done():
                    done.set_exception(self.stopped())
            self.waiting.clear()

    async def _drain(self) -> None:
        while self.waiting:
            taken: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
            count = 0
            while self.waiting and (not taken or count + len(self.waiting[0][0])
                                    <= self.max_items):
                entry = self.waiting.pop(0)
                taken.append(entry)
                count += len(entry[0])
            items = [item for batch, _ in taken for item in batch]
            self.calls += 1
            try:
                results = await self.send(items)
            except BaseException as exc:   # every submitter of this call hears of it
                # a cancel of this task is not a cancel of the submitters: an error
                failure = self.stopped() if isinstance(exc, asyncio.CancelledError) else exc
                for _, done in taken:
                    if not done.done():
                        done.set_exception(failure)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            start = 0
            for batch, done in taken:
                if not done.done():
                    done.set_result(results[start:start + len(batch)])
                start += len(batch)
