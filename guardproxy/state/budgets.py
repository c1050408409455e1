"""Token budget storage: reserve before a call, settle after it.

A reservation is a lease with a TTL held in every window of the budget at once; it is
settled with the real usage (idempotently) or released. Expired leases are reclaimed
by the next reservation on the same subject, so a replica that died mid-request holds
budget only until its lease expires. ``memory://`` implements the same semantics in
process; Redis does it in one Lua call per operation (``lua/budget_*.lua``).
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import RedisError

from guardproxy.errors import StoreError
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
    reset_at: float

    @property
    def remaining(self) -> int:
        return self.limit - self.used - self.reserved


@dataclass(slots=True)
class Reservation:
    ok: bool
    amount: int
    remaining: list[int]        # per window, after this reservation (or as found, if refused)
    resets: list[float]
    lease_id: str | None = None


class BudgetStore(ABC):
    @abstractmethod
    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation: ...

    @abstractmethod
    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        """Charge ``actual`` tokens and drop the reservation; False if already settled."""

    @abstractmethod
    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]: ...

    async def aclose(self) -> None:
        return None


class MemoryBudgetStore(BudgetStore):
    """One process's budgets. Every method runs without awaiting, so each is atomic
    on the event loop, as the Lua scripts are on Redis."""

    def __init__(self) -> None:
        self.windows: dict[str, list[int]] = {}              # key -> [used, reserved]
        self.expiry: dict[str, float] = {}                   # key -> when it may be dropped
        # lease id -> (state r|x, tokens held, window keys, deadline); deleted when settled
        self.leases: dict[str, tuple[str, int, tuple[str, ...], float]] = {}
        self.deadlines: list[tuple[float, str]] = []         # heap; stale entries skipped
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

    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation:
        now = time.time()
        self._sweep(now)
        keys, resets, remaining = [], [], []
        for w in windows:
            index, reset = w.bounds(now)
            key = self._key(subject, w, index)
            used, reserved = self.windows.get(key, (0, 0))
            keys.append(key)
            resets.append(reset)
            remaining.append(w.limit - used - reserved)
        if any(left < amount for left in remaining):
            return Reservation(False, amount, remaining, resets)
        for key, reset in zip(keys, resets, strict=True):
            self.windows.setdefault(key, [0, 0])[1] += amount
            self.expiry[key] = reset + GRACE
        lease_id = self.new_lease_id()
        self._hold(lease_id, ("r", amount, tuple(keys), now + ttl))
        return Reservation(True, amount, [r - amount for r in remaining], resets, lease_id)

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
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

    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]:
        now = time.time()
        self._sweep(now)
        out = []
        for w in windows:
            index, reset = w.bounds(now)
            used, reserved = self.windows.get(self._key(subject, w, index), (0, 0))
            out.append(WindowState(w.limit, used, reserved, reset))
        return out


def _script(name: str) -> str:
    return resources.files("guardproxy.state").joinpath(f"lua/{name}").read_text("utf-8")


class RedisBudgetStore(BudgetStore):
    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._reserve = client.register_script(_script("budget_reserve.lua"))
        self._settle = client.register_script(_script("budget_settle.lua"))
        self.new_lease_id = IdSource()

    def _tag(self, subject: str) -> str:
        # one hash tag per subject: all its keys live in one Redis Cluster slot
        return f"{self.prefix}:budget:{{{subject}}}"

    def _window_key(self, subject: str, w: Window, index: int) -> str:
        return f"{self._tag(subject)}:w{w.seconds}:{index}"

    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation:
        now = time.time()
        tag = self._tag(subject)
        keys, resets, args = [f"{tag}:leases", f"{tag}:deadlines"], [], []
        for w in windows:
            index, reset = w.bounds(now)
            keys.append(self._window_key(subject, w, index))
            resets.append(reset)
            args += [w.limit, int(reset - now + GRACE)]
        lease_id = self.new_lease_id()
        try:
            result = await self._reserve(keys=keys, args=[amount, lease_id, now, ttl,
                                                          GRACE, *args])
        except RedisError as exc:
            raise StoreError(f"budget store unavailable: {exc}") from exc
        ok = bool(result[0])
        return Reservation(ok, amount, [int(r) for r in result[1:]], resets,
                           lease_id if ok else None)

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        tag = self._tag(subject)
        try:
            result = await self._settle(keys=[f"{tag}:leases", f"{tag}:deadlines"],
                                        args=[lease_id, actual, time.time(), GRACE])
        except RedisError as exc:
            raise StoreError(f"budget store unavailable: {exc}") from exc
        return bool(result)

    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]:
        now = time.time()
        out = []
        try:
            for w in windows:
                index, reset = w.bounds(now)
                used, reserved = await self.client.hmget(
                    self._window_key(subject, w, index), "used", "reserved")
                out.append(WindowState(w.limit, int(used or 0), int(reserved or 0), reset))
        except RedisError as exc:
            raise StoreError(f"budget store unavailable: {exc}") from exc
        return out

    async def aclose(self) -> None:
        await self.client.aclose()

