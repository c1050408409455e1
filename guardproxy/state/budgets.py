"""Token budget storage: reserve before a call, settle after it.

A reservation is a lease with a TTL held in every window of the budget at once; it is
settled with the real usage (idempotently) or released, and renewed while a long
response streams. Expired leases are reclaimed by the next reservation on the same
subject, so a replica that died mid-request holds budget only until its lease expires.
``memory://`` implements the same semantics in process; Redis does it in one Lua call
per operation (``lua/*.lua``).

Time: on Redis every instant (window index, reset, lease deadline) is read from the
store's clock (``TIME``) inside the scripts, so replicas whose clocks disagree still
count into the same windows and never reclaim each other's live leases. ``now`` on a
``Reservation`` or ``WindowState`` is that clock at the operation: render relative
times (Retry-After, reset-in) as ``reset - now``, not against the local clock.

Carry (``carry``): when two linked clusters merge, the tokens the disappearing id has
*used* in its current windows are added to the same windows of the surviving id
(``linkage/carry.py`` calls it off the request path). The source keeps its counts (a
split may hand them back, and an in-flight reservation still settles there: that
settle is not carried unless the merge is reported again). Each target window
remembers how much it took from each source, so a repeated report adds only growth.
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guardproxy.ids import IdSource

GRACE = 3600.0  # how long an expired lease is remembered, so a late settle still charges


@dataclass(frozen=True, slots=True)
class Window:
    limit: int
    seconds: int

    def bounds(self, now: float) -> tuple[int, float]:
        index = int(now // self.seconds)
        return index, (index + 1) * self.seconds


@dataclass(slots=True)
class WindowState:
    limit: int
    used: int
    reserved: int
    reset_at: float             # unix time on the store's clock
    now: float = field(default_factory=time.time)  # the store's clock when read

    @property
    def remaining(self) -> int:
        return self.limit - self.used - self.reserved


@dataclass(frozen=True, slots=True)
class Carry:
    """Add ``source``'s used tokens to ``target``, in the current window of each of
    ``windows`` (the budget rule's; the same for both subjects)."""

    source: str
    target: str
    windows: tuple[Window, ...]


@dataclass(slots=True)
class Reservation:
    ok: bool
    amount: int
    remaining: list[int]        # per window, after this reservation (or as found, if refused)
    resets: list[float]         # per window, unix time it resets on the store's clock
    lease_id: str | None = None
    now: float = field(default_factory=time.time)  # the store's clock at the reservation


@dataclass(frozen=True, slots=True)
class Settle:
    """One lease to settle: ``actual`` tokens charged (0 releases it)."""

    subject: str
    lease_id: str
    actual: int


class BudgetStore(ABC):
    new_lease_id: Callable[[], str]   # a fresh, unique lease id

    @abstractmethod
    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation: ...

    @abstractmethod
    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        """Charge ``actual`` tokens and drop the reservation; False if already settled."""

    async def settle_many(self, items: Sequence[Settle]) -> list[bool]:
        """``settle`` each item, in order: per item, True if this call charged it. Raises
        ``StoreError`` if any part failed; then some items may have landed, and settling
        them again (idempotent) charges nothing more. This default loops (memory)."""
        return [await self.settle(i.subject, i.lease_id, i.actual) for i in items]

    @abstractmethod
    async def renew(self, subject: str, lease_id: str, ttl: float) -> bool:
        """Push a still-reserved lease's deadline to now + ``ttl`` seconds (never earlier
        than it was); False if the lease is unknown, settled, or already past its deadline
        (reclaimed or about to be: its late settle still charges, exactly once)."""

    @abstractmethod
    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]: ...

    @abstractmethod
    async def carry(self, carries: Sequence[Carry]) -> int:
        """Apply ``carries`` in order (a chain a -> b, b -> c carries a's use on to c):
        each adds what its source has used in the current windows and the target has
        not yet taken from that source (idempotent). Returns the tokens added over
        every window. Raises ``StoreError`` when the store is unavailable."""

    async def aclose(self) -> None:
        return None


class MemoryBudgetStore(BudgetStore):
    """One process's budgets. Every method runs without awaiting, so each is atomic
    on the event loop, as the Lua scripts are on Redis. ``clock`` gives unix seconds
    (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.windows: dict[str, list[int]] = {}              # key -> [used, reserved]
        self.expiry: dict[str, float] = {}                   # key -> when it may be dropped
        # lease id -> (state r|x, tokens held, window keys, deadline); deleted when settled
        self.leases: dict[str, tuple[str, int, tuple[str, ...], float]] = {}
        self.deadlines: list[tuple[float, str]] = []         # heap; stale entries skipped
        # window key -> {source subject: used tokens taken from it} (carry)
        self.carried: dict[str, dict[str, int]] = {}
        self._ops = 0
        self.new_lease_id = IdSource()

    def _key(self, subject: str, w: Window, index: int) -> str:
        return f"{subject}|{w.seconds}|{index}"

    def _hold(self, lease_id: str, lease: tuple[str, int, tuple[str, ...], float]) -> None:
        self.leases[lease_id] = lease
        heapq.heappush(self.deadlines, (lease[3], lease_id))

    def _sweep(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, lease_id = heapq.heappop(self.deadlines)
            lease = self.leases.get(lease_id)
            if lease is None or lease[3] != deadline:
                continue
            state, held, keys, _ = lease
            if state == "r":
                for key in keys:
                    if key in self.windows:
                        self.windows[key][1] -= held
                self._hold(lease_id, ("x", held, keys, now + GRACE))
            else:
                del self.leases[lease_id]
        self._ops += 1
        if self._ops % 4096 == 0:
            for key in [k for k, t in self.expiry.items() if t < now]:
                self.windows.pop(key, None)
                self.expiry.pop(key, None)
                self.carried.pop(key, None)

    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation:
        now = self.clock()
        self._sweep(now)
        keys, resets, remaining = self.peek(subject, windows, now)
        if any(left < amount for left in remaining):
            return Reservation(False, amount, remaining, resets, None, now)
        lease_id = self.hold(keys, resets, amount, now + ttl)
        return Reservation(True, amount, [r - amount for r in remaining], resets, lease_id,
                           now)

    def peek(self, subject: str, windows: tuple[Window, ...],
             now: float) -> tuple[list[str], list[float], list[int]]:
        """The current window keys, resets and tokens left of ``subject`` (synchronous:
        admission batches call it between other work without awaiting)."""
        keys, resets, remaining = [], [], []
        for w in windows:
            index, reset = w.bounds(now)
            key = self._key(subject, w, index)
            used, reserved = self.windows.get(key, (0, 0))
            keys.append(key)
            resets.append(reset)
            remaining.append(w.limit - used - reserved)
        return keys, resets, remaining

    def hold(self, keys: Sequence[str], resets: Sequence[float], amount: int,
             deadline: float, lease_id: str = "") -> str:
        """Reserve ``amount`` in the windows ``peek`` gave, under ``lease_id`` (a new
        one when none is given or it is taken); returns the lease id."""
        for key, reset in zip(keys, resets, strict=True):
            self.windows.setdefault(key, [0, 0])[1] += amount
            self.expiry[key] = reset + GRACE
        if not lease_id or lease_id in self.leases:
            lease_id = self.new_lease_id()
        self._hold(lease_id, ("r", amount, tuple(keys), deadline))
        return lease_id

    def sweep(self, now: float) -> None:
        """Reclaim the leases past their deadline (and now and then drop old windows)."""
        self._sweep(now)

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        return self.settle_now(lease_id, actual)

    def settle_now(self, lease_id: str, actual: int) -> bool:
        """``settle``, synchronously."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        state, held, keys, _ = lease
        for key in keys:
            window = self.windows.get(key)
            if window is not None:
                if state == "r":
                    window[1] -= held
                window[0] += actual
        return True

    async def renew(self, subject: str, lease_id: str, ttl: float) -> bool:
        now = self.clock()
        lease = self.leases.get(lease_id)
        if lease is None or lease[0] != "r" or lease[3] <= now:
            return False
        if now + ttl > lease[3]:
            self._hold(lease_id, (*lease[:3], now + ttl))  # the old heap entry goes stale
        return True

    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]:
        now = self.clock()
        self._sweep(now)
        out = []
        for w in windows:
            index, reset = w.bounds(now)
            used, reserved = self.windows.get(self._key(subject, w, index), (0, 0))
            out.append(WindowState(w.limit, used, reserved, reset, now))
        return out

    async def carry(self, carries: Sequence[Carry]) -> int:
        now = self.clock()
        self._sweep(now)
        added = 0
        for c in carries:
            if c.source == c.target:
                continue
            for w in c.windows:
                index, reset = w.bounds(now)
                used = self.windows.get(self._key(c.source, w, index), (0, 0))[0]
                key = self._key(c.target, w, index)
                before = self.carried.get(key, {}).get(c.source, 0)
                if used > before:
                    self.windows.setdefault(key, [0, 0])[0] += used - before
                    self.expiry[key] = reset + GRACE
                    self.carried.setdefault(key, {})[c.source] = used
                    added += used - before
        return added
