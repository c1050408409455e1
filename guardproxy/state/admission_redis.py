"""``AdmissionStore`` on Redis: a request's store work in one atomic script call.

    admission = RedisAdmission(client, "guardproxy")
    batch = await admission.admit(asks, record)      # ONE EVALSHA (admit.lua)

The script is composed of the linkage record (linkage_common.lua, linkage_record.lua:
when the batch records evidence on a Redis linkage store of this client), the lease
helpers (lease_common.lua), the ``limits`` strategies (quota_windows.lua) and
admit.lua, which judges the asks in order (see ``state/admission.py``). Budget keys
and leases are ``RedisBudgetStore``'s, so settles, renewals and carries are unchanged.
Quota keys are ``<prefix>:quota:{<rule>|<key>}:<strategy><seconds>``: one hash tag per
rule and key, a window per length (a reload that changes a limit keeps its counts).

Redis Cluster: the keys of one request live in several slots (its rules' tags, the
linkage graph's). The record runs first, on its own (the cluster id names the keys of
``per: cluster`` rules); then one script per slot, concurrently, each judging its own
asks; when one slot denies, what the others counted is given back (``_undo``), so a
denied request costs one more round of calls there. Every time is the store's clock
(TIME), unless ``clock`` is given (tests drive the windows with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from guardproxy.errors import StoreError
from guardproxy.ids import IdSource
from guardproxy.linkage.api import Cluster
from guardproxy.state.admission import (
    ALLOWED,
    DENIED,
    NOT_JUDGED,
    AdmissionStore,
    Ask,
    Batch,
    BudgetAsk,
    GateAsk,
    QuotaAsk,
    RecordAsk,
    Refusal,
    Result,
    Template,
    judge_gate,
    render,
)
from guardproxy.state.budgets import GRACE
from guardproxy.state.group import GroupCommit
from guardproxy.state.redis_client import preload

log = logging.getLogger("guardproxy.admission")
Request = tuple[Sequence[Ask], RecordAsk | None]   # one request's asks and record
MAX_REQUESTS = 64   # requests judged in one call at most: bounds the script's run time
Release = Callable[[list[tuple[str, str]], StoreError], None]   # (subject, lease id)s


def _lua(*names: str) -> str:
    return "\n".join(resources.files("guardproxy.state").joinpath(f"lua/{name}")
                     .read_text("utf-8") for name in names)


def admit_script(*, recording: bool) -> str:
    """admit.lua with what it needs prepended (module docstring); ``recording``: the
    variant that records linkage evidence first."""
    windows = _lua("lease_common.lua", "quota_windows.lua")
    if not recording:
        head = ("local A, EVENTS = 1, {}\n"
                "local function record_request() error('no linkage in this call') end\n")
        return f"{windows}\n{head}{_lua('admit.lua')}"
    return (f"{_lua('linkage_common.lua', 'linkage_record.lua')}\n{windows}\n"
            f"local A = ARG\n{_lua('admit.lua')}")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class RedisAdmission(AdmissionStore):
    def __init__(self, client: Any, prefix: str,
                 clock: Callable[[], float] | None = None,
                 release: Release | None = None) -> None:
        self.client = client
        self.release = release
        self.prefix = prefix
        self.clock = clock
        self.sharded = isinstance(client, RedisCluster)
        self._plain = client.register_script(admit_script(recording=False))
        self._recording = client.register_script(admit_script(recording=True))
        self._ops = client.register_script(_lua("quota_windows.lua", "quota_ops.lua"))
        self._loaded: set[str] = set()   # scripts loaded on every primary (Cluster)
        self._group: GroupCommit[Request, Batch | StoreError] = GroupCommit(
            self._send, MAX_REQUESTS, lambda: StoreError("admission call cancelled"))
        self.new_marker = IdSource()   # a request's marker (Cluster resends)
        self._undo_script = client.register_script(
            _lua("lease_common.lua", "quota_windows.lua", "admit_undo.lua"))

    # -- keys ---------------------------------------------------------------------
    def quota_tag(self, ask: QuotaAsk) -> Template:
        return _wrapped(ask.key, f"{self.prefix}:quota:{{{ask.rule}|", "}")

    def budget_tag(self, ask: BudgetAsk) -> Template:
        return _wrapped(ask.subject, f"{self.prefix}:budget:{{", "}")

    def _now(self) -> str:
        return repr(float(self.clock())) if self.clock is not None else ""

    # -- admission ----------------------------------------------------------------
    async def admit(self, asks: Sequence[Ask], record: RecordAsk | None = None) -> Batch:
        inline = record is None or getattr(record.store, "client", None) is self.client
        if self.sharded or not inline:
            return await self._admit_apart(asks, record)
        (batch,) = await self._group.submit([(asks, record)])
        if isinstance(batch, StoreError):
            raise batch
        return batch

    async def _send(self, requests: list[Request]) -> list[Batch | StoreError]:
        """One script call judging ``requests`` in turn (a group commit, ``GroupCommit``).
        Raises ``StoreError``."""
        stores = {id(r.store): r.store for _, r in requests if r is not None}
        if len(stores) > 1:   # linkage settings changed by a reload: one call per store
            return [b for request in requests for b in await self._send([request])]
        store = next(iter(stores.values()), None)
        args: list[Any]
        if store is not None:
            script, keys = self._recording, [store.base]
            args = store.args(max(r.now for _, r in requests if r is not None))
        else:
            script, keys, args = self._plain, [self._first_key(requests[0][0])], []
        args += [self._now(), repr(GRACE), len(requests)]
        for asks, record in requests:
            section: list[Any] = [""]   # no marker: this client never resends
            if record is None:
                section.append(0)
            else:
                section += [1, *record.store.record_args(record.account, record.evidence,
                                                         record.pairs)]
            section += self._args(asks)
            args += [len(section), *section]
        try:
            reply = await script(keys=keys, args=args)
        except RedisError as exc:
            error = StoreError(f"admission store unavailable: {exc}")
            self._give_back([ask for asks, _ in requests for ask in asks], error)
            raise error from exc
        if store is not None:
            store.events(reply[2])
        now = float(_text(reply[0])) + int(reply[1]) / 1e6
        return [_failed(part) or self._batch(asks, part[1], now, _cluster(part[0]))
                for (asks, _), part in zip(requests, reply[3], strict=True)]

    def _first_key(self, asks: Sequence[Ask]) -> str:
        for ask in asks:   # routes the call (Cluster): a key of the batch's one slot
            if isinstance(ask, QuotaAsk):
                return render(self.quota_tag(ask), "")
            if isinstance(ask, BudgetAsk):
                return render(self.budget_tag(ask), "")
        return f"{self.prefix}:admit"

    def _args(self, asks: Sequence[Ask]) -> list[Any]:
        """One request's ops, as admit.lua reads them: their number, then each."""
        args: list[Any] = [len(asks)]
        for ask in asks:
            shadow = 1 if ask.shadow else 0
            if isinstance(ask, QuotaAsk):
                tag = self.quota_tag(ask)
                args += ["q", shadow, ask.strategy, len(tag), *tag, len(ask.windows)]
                for limit, seconds in ask.windows:
                    args += [limit, seconds]
            elif isinstance(ask, BudgetAsk):
                tag = self.budget_tag(ask)
                args += ["b", shadow, len(tag), *tag, ask.lease_id, 1 if ask.generates else 0,
                         repr(ask.prompt_weight), ask.prompt, repr(ask.completion_weight),
                         ask.copies, ask.cap, 1 if ask.clamp else 0, ask.min_tokens,
                         repr(float(ask.ttl)), len(ask.windows)]
                for w in ask.windows:
                    args += [w.limit, w.seconds]
            elif isinstance(ask, GateAsk):
                args += ["g", shadow, ask.max_accounts or 0, 1 if ask.blocked else 0]
            else:
                args += ["x", 0]
        return args

    def _batch(self, asks: Sequence[Ask], replies: list[Any], now: float,
               cluster: Cluster | None) -> Batch:
        results: list[Result] = []
        stopped = False
        for ask, raw in zip(asks, replies, strict=True):
            status = int(raw[0])
            if status < 0:
                results.append(NOT_JUDGED)
                continue
            stopped = stopped or (status == DENIED and not ask.shadow)
            if isinstance(ask, QuotaAsk):
                n = len(ask.windows)
                results.append(Result(status, denied=int(raw[1]) - 1,
                                      remaining=tuple(int(x) for x in raw[2:2 + n]),
                                      resets=tuple(float(_text(x)) for x in raw[2 + n:])))
            elif isinstance(ask, BudgetAsk):
                n = len(ask.windows)
                results.append(Result(status, amount=int(raw[1]), cap=int(raw[2]),
                                      remaining=tuple(int(x) for x in raw[3:3 + n]),
                                      resets=tuple(float(_text(x)) for x in raw[3 + n:]),
                                      lease_id=ask.lease_id if status == ALLOWED else None))
            else:
                results.append(Result(status))
        if stopped:   # the script gave every lease back
            for result in results:
                result.lease_id = None
        return Batch(now, cluster, results, stopped)

    async def _admit_apart(self, asks: Sequence[Ask], record: RecordAsk | None) -> Batch:
        """Redis Cluster (or a linkage store elsewhere): the record first, then one
        script per slot, concurrently; a denial in one slot undoes the others."""
        cluster = None
        if record is not None:
            try:
                cluster = await record.store.record(record.account, list(record.evidence),
                                                    record.now, record.pairs)
            except RedisError as exc:
                raise StoreError(f"admission store unavailable: {exc}") from exc
        cid = cluster.id if cluster is not None else ""
        resolved: list[Ask] = [_resolved(ask, cid) for ask in asks]
        try:
            await preload(self.client, [self._plain, self._undo_script], self._loaded)
        except RedisError as exc:
            raise StoreError(f"admission store unavailable: {exc}") from exc
        groups: dict[int, list[int]] = {}
        for i, ask in enumerate(resolved):
            if isinstance(ask, QuotaAsk | BudgetAsk):
                groups.setdefault(key_slot(self._first_key([ask]).encode()), []).append(i)
        marker = self.new_marker()
        calls = []
        for idx in groups.values():
            route = self._first_key([resolved[i] for i in idx])
            # the client resends after a lost reply: the marker makes that a no-op
            section = [f"{route}:admitted:{marker}", 0, *self._args([resolved[i] for i in idx])]
            calls.append(self._plain(keys=[route], args=[self._now(), repr(GRACE), 1,
                                                          len(section), *section]))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        results: list[Result] = [NOT_JUDGED] * len(asks)
        parts: list[tuple[list[int], Batch]] = []
        error: BaseException | None = None
        for idx, reply in zip(groups.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                error = error or reply
                continue
            failed = _failed(reply[3][0])
            if failed is not None:
                error = error or failed
                continue
            part = self._batch([resolved[i] for i in idx], reply[3][0][1],
                               float(_text(reply[0])) + int(reply[1]) / 1e6, None)
            parts.append((idx, part))
            for i, result in zip(idx, part.results, strict=True):
                results[i] = result
        for i, ask in enumerate(resolved):
            if isinstance(ask, GateAsk):
                results[i] = judge_gate(ask, cluster)
            elif isinstance(ask, Refusal):
                results[i] = Result(DENIED)
        if error is not None:   # what the slots that answered counted is given back
            await self._undo(resolved, parts)
            failure = error if isinstance(error, StoreError) else \
                StoreError(f"admission store unavailable: {error}")
            answered = {i for idx, _ in parts for i in idx}
            self._give_back([a for i, a in enumerate(resolved) if i not in answered], failure)
            raise failure from error
        now = max((part.now for _, part in parts), default=0.0)
        first = next((i for i, (a, r) in enumerate(zip(resolved, results, strict=True))
                      if r.status == DENIED and not a.shadow), None)
        if first is None:
            return Batch(now, cluster, results, False)
        await self._undo(resolved, parts)
        results = [r if i <= first else NOT_JUDGED for i, r in enumerate(results)]
        for result in results:
            result.lease_id = None
        return Batch(now, cluster, results, True)

    def _give_back(self, asks: Sequence[Ask], error: StoreError) -> None:
        """A call failed, perhaps after it ran (its reply lost): the leases it may hold
        go to ``release`` (the settle retry queue: a lease never taken settles as
        nothing). Quota hits it may have counted stay: stricter, never looser. A
        ``per: cluster`` lease's key is not known here: its TTL reclaims it."""
        if self.release is not None:
            self.release([(ask.subject[0], ask.lease_id) for ask in asks
                          if isinstance(ask, BudgetAsk) and len(ask.subject) == 1], error)

    async def _undo(self, asks: Sequence[Ask], parts: list[tuple[list[int], Batch]]) -> None:
        """Give back what the slots that allowed the request counted and reserved: one
        call per such slot, concurrently. Best effort: a slot that fails keeps its hits
        (stricter, never looser) and its leases until their TTL reclaims them."""
        calls = []
        for idx, part in parts:
            if part.stopped:   # its own script gave everything back
                continue
            quotas: list[Any] = []
            leases: list[Any] = []
            for i, result in zip(idx, part.results, strict=True):
                ask = asks[i]
                if isinstance(ask, QuotaAsk) and result.allowed:
                    quotas += [ask.strategy, render(self.quota_tag(ask), ""),
                               len(ask.windows), *(seconds for _, seconds in ask.windows)]
                elif isinstance(ask, BudgetAsk) and result.lease_id is not None:
                    tag = render(self.budget_tag(ask), "")
                    leases += [f"{tag}:leases", f"{tag}:deadlines", result.lease_id]
            if quotas or leases:
                n = sum(1 for i, r in zip(idx, part.results, strict=True)
                        if isinstance(asks[i], QuotaAsk) and r.allowed)
                calls.append(self._undo_script(
                    keys=[self._first_key([asks[i] for i in idx])],
                    args=[repr(part.now), n, *quotas, *leases]))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("giving back a denied request's counts failed: %s", outcome)

    # -- outside admission ------------------------------------------------------------
    async def quota_state(self, ask: QuotaAsk, cluster_id: str = "") -> Result:
        tag = render(self.quota_tag(ask), cluster_id)
        args: list[Any] = ["state", self._now(), ask.strategy, len(ask.windows)]
        for limit, seconds in ask.windows:
            args += [limit, seconds]
        try:
            raw = await self._ops(keys=[tag], args=args)
        except RedisError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc
        n = len(ask.windows)
        remaining = tuple(int(x) for x in raw[:n])
        denied = next((i for i, left in enumerate(remaining) if left < 1), -1)
        return Result(ALLOWED if denied < 0 else DENIED, denied=denied, remaining=remaining,
                      resets=tuple(float(_text(x)) for x in raw[n:]))

    async def carry_quota(self, ask: QuotaAsk, moves: Sequence[tuple[str, str]]) -> int:
        if ask.strategy not in ("f", "s"):
            return 0
        added = 0
        try:
            for source, target in moves:
                if source == target:
                    continue
                src = render(self.quota_tag(_keyed(ask, source)), "")
                dst = render(self.quota_tag(_keyed(ask, target)), "")
                for _, seconds in ask.windows:
                    count = int(await self._ops(keys=[src], args=[
                        "count", self._now(), ask.strategy, seconds]))
                    if count <= 0:
                        continue
                    added += int(await self._ops(keys=[dst], args=[
                        "add", self._now(), ask.strategy, seconds, count,
                        f"{seconds}:{len(source)}:{source}", seconds]))
        except RedisError as exc:
            raise StoreError(f"quota store unavailable: {exc}") from exc
        return added


def _failed(part: list[Any]) -> StoreError | None:
    """A request's ``{'e', message}`` answer (a Redis error in its ops) as an error."""
    if part and isinstance(part[0], bytes | str) and _text(part[0]) == "e":
        return StoreError(f"admission store error: {_text(part[1])}")
    return None


def _cluster(raw: list[Any]) -> Cluster | None:
    """A ``cluster(account)`` reply (id, size, blocked 0/1), or None for ``{}``."""
    if not raw:
        return None
    return Cluster(id=_text(raw[0]), size=int(raw[1]), linked_to_blocked=bool(raw[2]))


def _wrapped(template: Template, head: str, tail: str) -> Template:
    if len(template) == 1:
        return (head + template[0] + tail,)
    return (head + template[0], *template[1:-1], template[-1] + tail)


def _keyed(ask: QuotaAsk, key: str) -> QuotaAsk:
    return QuotaAsk(ask.rule, ask.shadow, ask.strategy, (key,), ask.windows)


def _resolved(ask: Ask, cluster_id: str) -> Ask:
    """``ask`` with its key rendered for ``cluster_id`` (one-part templates)."""
    if isinstance(ask, QuotaAsk):
        return QuotaAsk(ask.rule, ask.shadow, ask.strategy, (render(ask.key, cluster_id),),
                        ask.windows)
    if isinstance(ask, BudgetAsk):
        return replace(ask, subject=(render(ask.subject, cluster_id),))
    return ask
