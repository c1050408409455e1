"""``RedisBudgetStore``: token budgets in Redis, Sentinel or Cluster (``budgets.py`` has
the interface and the memory store): one Lua script call per operation; the settles of
concurrent requests share calls (``group.GroupCommit``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from guardproxy.errors import StoreError
from guardproxy.ids import IdSource
from guardproxy.state.admission import BudgetAsk
from guardproxy.state.admission_redis import RedisAdmission
from guardproxy.state.budgets import (
    GRACE,
    BudgetStore,
    Carry,
    Reservation,
    Settle,
    Window,
    WindowState,
)
from guardproxy.state.group import GroupCommit
from guardproxy.state.redis_client import preload


def _script(*names: str) -> str:
    return "\n".join(resources.files("guardproxy.state").joinpath(f"lua/{name}")
                     .read_text("utf-8") for name in names)


def _store_time(seconds: bytes | str | int, micros: bytes | str | int) -> float:
    return int(seconds) + int(micros) / 1e6


class RedisBudgetStore(BudgetStore):
    """Budgets in Redis, Sentinel or Cluster: one Lua call per operation. Every instant
    comes from the store's clock inside the scripts; this class reads no local clock.
    All of a subject's keys share the hash tag ``{subject}``: one Cluster slot."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._admission = RedisAdmission(client, prefix)
        self._usage = client.register_script(_script("lease_common.lua", "budget_usage.lua"))
        self._settle = client.register_script(_script("lease_common.lua", "budget_settle.lua"))
        self._settle_many = client.register_script(_script("lease_common.lua",
                                                           "budget_settle_many.lua"))
        self._renew = client.register_script(_script("lease_renew.lua"))
        self._carry = client.register_script(_script("lease_common.lua", "budget_carry.lua"))
        self.new_lease_id = IdSource()
        self._loaded: set[str] = set()   # scripts loaded on every primary (Cluster)
        self._group: GroupCommit[Settle, bool] = GroupCommit(
            self._settle_now, stopped=lambda: StoreError("settle call cancelled"))

    def _tag(self, subject: str) -> str:
        # one hash tag per subject: all its keys live in one Redis Cluster slot
        return f"{self.prefix}:budget:{{{subject}}}"

    def _keys(self, subject: str, windows: tuple[Window, ...] = ()) -> list[str]:
        """Leases hash, deadlines zset, then each window's key prefix: the script appends
        ``:<index>`` from the store's clock."""
        tag = self._tag(subject)
        return [f"{tag}:leases", f"{tag}:deadlines", *(f"{tag}:w{w.seconds}" for w in windows)]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisError as exc:
            raise StoreError(f"budget store unavailable: {exc}") from exc

    async def reserve(self, subject: str, windows: tuple[Window, ...], amount: int,
                      ttl: float) -> Reservation:
        """``amount`` tokens in every window of ``subject``, as an admission batch of
        one (admit.lua reserves for requests; one implementation of the reservation)."""
        ask = BudgetAsk(rule="", shadow=False, subject=(subject,), lease_id=self.new_lease_id(),
                        generates=False, prompt_weight=1.0, prompt=amount,
                        completion_weight=0.0, copies=1, cap=0, clamp=False, min_tokens=1,
                        windows=windows, ttl=ttl)
        batch = await self._admission.admit([ask])
        result = batch.results[0]
        return Reservation(result.allowed, result.amount, list(result.remaining),
                           list(result.resets), result.lease_id, batch.now)

    async def settle(self, subject: str, lease_id: str, actual: int) -> bool:
        return bool(await self._call(self._settle, self._keys(subject), [lease_id, actual]))

    async def settle_many(self, items: Sequence[Settle]) -> list[bool]:
        """One script call for all of ``items``; on Redis Cluster one per hash slot the
        subjects fall in, sent concurrently (a failed slot raises after all have run).
        Concurrent requests share calls (``group.GroupCommit``): under load one call
        settles many requests' leases."""
        return await self._group.submit(list(items))

    async def _settle_now(self, items: list[Settle]) -> list[bool]:
        if not items:
            return []
        groups: dict[int, list[int]] = {}   # slot -> indexes into items
        cluster = isinstance(self.client, RedisCluster)
        for n, item in enumerate(items):
            slot = key_slot(self._tag(item.subject).encode()) if cluster else 0
            groups.setdefault(slot, []).append(n)
        parts = list(groups.values())
        if len(parts) > 1:
            try:
                await preload(self.client, [self._settle_many], self._loaded)
            except RedisError as exc:
                raise StoreError(f"budget store unavailable: {exc}") from exc
        replies = await asyncio.gather(*(self._settle_part([items[n] for n in part])
                                         for part in parts), return_exceptions=True)
        out = [False] * len(items)
        for part, reply in zip(parts, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for n, charged in zip(part, reply, strict=True):
                out[n] = charged
        return out

    async def _settle_part(self, items: list[Settle]) -> list[bool]:
        keys: list[str] = []
        args: list[Any] = []
        for item in items:
            keys += self._keys(item.subject)
            args += [item.lease_id, item.actual]
        return [bool(x) for x in await self._call(self._settle_many, keys, args)]

    async def renew(self, subject: str, lease_id: str, ttl: float) -> bool:
        return bool(await self._call(self._renew, self._keys(subject),
                                     [lease_id, ttl, GRACE]))

    async def usage(self, subject: str, windows: tuple[Window, ...]) -> list[WindowState]:
        result = await self._call(self._usage, self._keys(subject, windows),
                                  [GRACE, *(w.seconds for w in windows)])
        now = _store_time(result[0], result[1])
        return [WindowState(w.limit, int(result[2 + 3 * i]), int(result[3 + 3 * i]),
                            float(result[4 + 3 * i]), now)
                for i, w in enumerate(windows)]

    async def carry(self, carries: Sequence[Carry]) -> int:
        """One script call for the whole batch; on Redis Cluster, where a source and its
        target are in different slots, two per carry: read the source, add to the target."""
        todo = [c for c in carries if c.source != c.target and c.windows]
        if not todo:
            return 0
        if isinstance(self.client, RedisCluster):
            added = 0
            for c in todo:
                args: list[Any] = [GRACE, 1, len(c.windows), c.source, 1]
                for w, state in zip(c.windows, await self.usage(c.source, c.windows),
                                    strict=True):
                    args += [w.seconds, round(state.reset_at / w.seconds) - 1, state.used]
                added += int(await self._call(self._carry, self._keys(c.target, c.windows)[2:],
                                              args))
            return added
        keys: list[str] = []
        args = [GRACE, len(todo)]
        for c in todo:
            keys += self._keys(c.source, c.windows)[2:] + self._keys(c.target, c.windows)[2:]
            args += [len(c.windows), c.source, 0, *(w.seconds for w in c.windows)]
        return int(await self._call(self._carry, keys, args))

    async def aclose(self) -> None:
        await self.client.aclose()
