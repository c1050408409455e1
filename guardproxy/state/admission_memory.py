"""``AdmissionStore`` for ``memory://``: one process, no round trips.

A batch runs without awaiting between its asks (the linkage record, an in-process
graph, is awaited first), so it is atomic on the event loop as admit.lua is on Redis.
Quota windows are ``state/windows.py`` (the ``limits`` strategies, checked against
``limits`` itself in tests/test_quota_windows.py); budgets are the state's
``MemoryBudgetStore``, so settles, renewals, usage and carries see the same leases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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
    Result,
    budget_amount,
    clamped,
    judge_gate,
    render,
)
from guardproxy.state.budgets import MemoryBudgetStore
from guardproxy.state.windows import MemoryWindows

MARKERS_SWEEP = 4096   # carry markers are dropped after their window, checked this often


class MemoryAdmission(AdmissionStore):
    def __init__(self, budgets: MemoryBudgetStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.budgets = budgets
        self.clock = clock
        self.windows = MemoryWindows()
        self.markers: dict[str, float] = {}   # carry marker -> when it may be dropped

    async def admit(self, asks: Sequence[Ask], record: RecordAsk | None = None) -> Batch:
        cluster = None
        if record is not None:
            cluster = await record.store.record(record.account, list(record.evidence),
                                                record.now, record.pairs)
        cid = cluster.id if cluster is not None else ""
        now = self.clock()
        self.budgets.sweep(now)
        results: list[Result] = []
        hits: list[tuple[QuotaAsk, str, int]] = []
        leases: list[str] = []
        running: int | None = None   # the cap an earlier budget rule settled on
        stopped = False
        for ask in asks:
            if stopped:
                results.append(NOT_JUDGED)
                continue
            if isinstance(ask, QuotaAsk):
                key = f"{ask.rule}|{render(ask.key, cid)}"   # as Redis's {rule|key} tag
                result = self._quota(ask, key, now)
                if result.allowed:
                    hits.append((ask, key, len(results)))
            elif isinstance(ask, BudgetAsk):
                result = self._budget(ask, render(ask.subject, cid), now, running)
                if result.lease_id is not None:
                    leases.append(result.lease_id)
                if result.allowed and ask.generates and not ask.shadow:
                    running = result.cap
            elif isinstance(ask, GateAsk):
                result = judge_gate(ask, cluster)
            else:
                result = Result(DENIED)
            results.append(result)
            stopped = result.status == DENIED and not ask.shadow
        if stopped:
            for lease_id in leases:
                self.budgets.settle_now(lease_id, 0)
            for result in results:
                result.lease_id = None
        else:
            for ask, key, i in hits:
                for limit, seconds in ask.windows:
                    self.windows.hit(ask.strategy, _window(key, ask.strategy, seconds),
                                     limit, seconds, now, 1)
                # what the headers say: the windows once this request counted
                after = self._quota(ask, key, now)
                results[i] = Result(ALLOWED, remaining=after.remaining, resets=after.resets)
        return Batch(now, cluster, results, stopped)

    def _quota(self, ask: QuotaAsk, key: str, now: float) -> Result:
        remaining, resets, denied = [], [], -1
        for i, (limit, seconds) in enumerate(ask.windows):
            left, reset = self.windows.peek(ask.strategy, _window(key, ask.strategy, seconds),
                                            limit, seconds, now)
            remaining.append(left)
            resets.append(reset)
            if left < 1 and denied < 0:
                denied = i
        return Result(ALLOWED if denied < 0 else DENIED, denied=denied,
                      remaining=tuple(remaining), resets=tuple(resets))

    def _budget(self, ask: BudgetAsk, subject: str, now: float, running: int | None) -> Result:
        cap = 0 if not ask.generates else running if running is not None else ask.cap
        keys, resets, left = self.budgets.peek(subject, ask.windows, now)
        smallest, amount = min(left), budget_amount(ask, cap)
        ok = smallest >= amount
        if not ok:
            lower = clamped(ask, smallest, cap)
            if lower is not None:
                ok, cap, amount = True, lower, budget_amount(ask, lower)
        lease_id = None
        if ok:
            # the ask's own lease id, as on Redis: the guard made one already
            lease_id = self.budgets.hold(keys, resets, amount, now + ask.ttl, ask.lease_id)
            left = [x - amount for x in left]
        return Result(ALLOWED if ok else DENIED, amount=amount, cap=cap,
                      remaining=tuple(left), resets=tuple(resets), lease_id=lease_id)

    async def quota_state(self, ask: QuotaAsk, cluster_id: str = "") -> Result:
        return self._quota(ask, f"{ask.rule}|{render(ask.key, cluster_id)}", self.clock())

    async def carry_quota(self, ask: QuotaAsk, moves: Sequence[tuple[str, str]]) -> int:
        if ask.strategy not in ("f", "s"):
            return 0
        now, added = self.clock(), 0
        self._sweep_markers(now)
        for source, target in moves:
            if source == target:
                continue
            source, target = f"{ask.rule}|{source}", f"{ask.rule}|{target}"
            for _, seconds in ask.windows:
                count = self.windows.count(ask.strategy, _window(source, ask.strategy, seconds),
                                           seconds, now)
                # once per merge and window: a repeated report adds nothing
                marker = f"{source}\x00{target}\x00{seconds}"
                if count <= 0 or self.markers.get(marker, 0.0) > now:
                    continue
                self.markers[marker] = now + seconds
                self.windows.add(ask.strategy, _window(target, ask.strategy, seconds),
                                 seconds, now, count)
                added += count
        return added

    def _sweep_markers(self, now: float) -> None:
        if len(self.markers) >= MARKERS_SWEEP:
            for marker in [m for m, t in self.markers.items() if t < now]:
                del self.markers[marker]


def _window(key: str, strategy: str, seconds: int) -> str:
    return f"{key}:{strategy}{seconds}"
