"""Quota windows in process: the ``limits`` library's three strategies on plain dicts.

The in-process twin of ``lua/quota_windows.lua`` (same four functions, same arithmetic),
for ``memory://``. Both reproduce ``limits`` 5.8's strategies on its in-memory storage
(``limits.aio.strategies`` over ``limits.aio.storage.MemoryStorage``), float for float;
tests/test_quota_windows.py checks all three against ``limits`` itself, step by step.

Strategies (``STRATEGY_CODES``), a window being ``limit`` per ``seconds``:

- ``'f'`` fixed window: opens at its first hit (not aligned to the epoch), counts until
  ``opened + seconds`` (closed at that instant).
- ``'m'`` moving window: one timestamp per counted request; a request counts for
  ``seconds`` after it was made. At most ``limit`` timestamps are kept per key.
- ``'s'`` sliding window counter: epoch-aligned windows (index ``int(now / seconds)``),
  the previous one weighted by the part of it still inside the sliding window.

``remaining`` is what ``limits``' ``get_window_stats`` reports, except at the rare
instants where ``limits`` contradicts itself (its stats show room that its ``hit`` then
refuses): there it is 0, so that "admit iff every window has ``remaining >= 1``" is
exactly ``limits``' decision. These instants: a moving window whose ``limit``-th newest
request was made exactly ``seconds`` ago (``limits`` counts it in ``hit``, not in its
stats), and a sliding window where ``floor(weighted + 1)`` rounds past ``floor(weighted)
+ 1`` (``limits``' hit re-checks after counting and takes the hit back).

All time comes from ``now`` (unix seconds, non-decreasing per key). Windows whose time
is over are dropped by a sweep every ``max(SWEEP_EVERY, keys held)`` calls, so memory is
bounded and the sweep costs O(1) per call, amortised.
"""

from __future__ import annotations

import math
from collections import deque

STRATEGY_CODES = {"fixed-window": "f", "moving-window": "m", "sliding-window": "s"}
SWEEP_EVERY = 4096


class MemoryWindows:
    """Windows of any strategy, each under its own key (one strategy per key).

    ``peek(strategy, key, limit, seconds, now) -> (remaining >= 0, reset_at)``;
    ``hit(strategy, key, limit, seconds, now, amount)`` counts ``amount`` (the caller
    peeked first: ``hit`` never refuses); ``count(strategy, key, seconds, now)`` is what
    the limiter counts now; ``add(strategy, key, seconds, now, amount)`` adds without a
    limit (``'f'`` and ``'s'`` only). An unknown strategy raises ``ValueError``.
    """

    __slots__ = ("_calls", "_fixed", "_moving", "_sliding")

    def __init__(self) -> None:
        self._fixed: dict[str, list[float]] = {}            # key -> [count, closes at]
        self._moving: dict[str, tuple[int, deque[float]]] = {}   # key -> (seconds, times)
        # key -> {window index: [count, expires at]}; at most 3 indices can be read
        self._sliding: dict[str, dict[int, list[float]]] = {}
        self._calls = 0

    def __len__(self) -> int:
        """Keys held (all strategies)."""
        return len(self._fixed) + len(self._moving) + len(self._sliding)

    # -- the four operations -------------------------------------------------------------

    def peek(self, strategy: str, key: str, limit: int, seconds: int,
             now: float) -> tuple[int, float]:
        self._tick(now)
        if strategy == "f":
            rec = self._fixed.get(key)
            if rec is None or rec[1] <= now:
                return limit if limit > 0 else 0, now
            left = limit - int(rec[0])
            return left if left > 0 else 0, rec[1]
        if strategy == "s":
            return self._sliding_peek(key, limit, seconds, now)
        if strategy == "m":
            return self._moving_peek(key, limit, seconds, now)
        raise ValueError(f"unknown window strategy {strategy!r}")

    def hit(self, strategy: str, key: str, limit: int, seconds: int, now: float,
            amount: int = 1) -> None:
        self._tick(now)
        if strategy == "m":
            self._moving_hit(key, limit, seconds, now, amount)
        else:
            self.add(strategy, key, seconds, now, amount)

    def count(self, strategy: str, key: str, seconds: int, now: float) -> int:
        if strategy == "f":
            rec = self._fixed.get(key)
            return 0 if rec is None or rec[1] <= now else int(rec[0])
        if strategy == "s":
            prev, _, current, _ = self._sliding_counts(key, seconds, now)
            return math.floor(prev * _prev_ttl(prev, seconds, now) / seconds + current)
        if strategy == "m":
            times = self._moving_times(key, seconds, now)
            return 0 if times is None else len(times) - _at_cutoff(times, now - seconds)
        raise ValueError(f"unknown window strategy {strategy!r}")

    def add(self, strategy: str, key: str, seconds: int, now: float, amount: int) -> None:
        if strategy == "f":   # limits' MemoryStorage.incr
            rec = self._fixed.get(key)
            if rec is None or rec[1] <= now:
                self._fixed[key] = [amount, now + seconds]
            else:
                rec[0] += amount
                if rec[0] == amount:
                    rec[1] = now + seconds
        elif strategy == "s":   # limits' incr of the current window, expiring in 2 windows
            index = int(now / seconds)
            slots = self._sliding.get(key)
            if slots is None:
                self._sliding[key] = {index: [amount, now + 2 * seconds]}
                return
            rec = slots.get(index)
            if rec is None or rec[1] <= now:
                if rec is None and slots:
                    _drop_unreadable(slots, int((now - seconds) / seconds), now)
                slots[index] = [amount, now + 2 * seconds]
            else:
                rec[0] += amount
                if rec[0] == amount:
                    rec[1] = now + 2 * seconds
        elif strategy == "m":
            raise ValueError("a moving window cannot be added to (it holds timestamps)")
        else:
            raise ValueError(f"unknown window strategy {strategy!r}")

    # -- sliding window counter ----------------------------------------------------------

    def _sliding_counts(self, key: str, seconds: int,
                        now: float) -> tuple[int, int, int, int]:
        """(previous count, previous index, current count, current index), as limits'
        ``sliding_window_keys`` names them: ``int((now - seconds) / seconds)`` is not
        always ``int(now / seconds) - 1`` in floats, so both are computed as it does."""
        prev_i, cur_i = int((now - seconds) / seconds), int(now / seconds)
        slots = self._sliding.get(key)
        if not slots:
            return 0, prev_i, 0, cur_i
        prev = current = 0
        rec = slots.get(prev_i)
        if rec is not None and rec[1] > now:
            prev = int(rec[0])
        rec = slots.get(cur_i)
        if rec is not None and rec[1] > now:
            current = int(rec[0])
        return prev, prev_i, current, cur_i

    def _sliding_peek(self, key: str, limit: int, seconds: int,
                      now: float) -> tuple[int, float]:
        prev, _, current, _ = self._sliding_counts(key, seconds, now)
        prev_ttl = _prev_ttl(prev, seconds, now)
        weighted = prev * prev_ttl / seconds   # limits: prev * ttl / expiry + current
        left = limit - math.floor(weighted + current)
        # limits' hit counts, then re-checks floor(weighted + current + 1) and takes
        # the hit back if that rounded past the limit
        if left >= 1 and math.floor(weighted + (current + 1)) > limit:
            left = 0
        if left < 0:
            left = 0
        if not (prev or current):
            return left, now
        reset_in = math.inf
        if prev:
            reset_in = prev_ttl % (seconds / prev)
        if current:
            current_ttl = (1 - ((now / seconds) % 1)) * seconds + seconds
            reset_in = min(reset_in, current_ttl % seconds)
        return left, now + reset_in

    # -- moving window -------------------------------------------------------------------

    def _moving_times(self, key: str, seconds: int, now: float) -> deque[float] | None:
        """The key's timestamps at or after ``now - seconds``, oldest first."""
        rec = self._moving.get(key)
        if rec is None:
            return None
        times, cutoff = rec[1], now - seconds
        while times and times[0] < cutoff:
            times.popleft()
        return times

    def _moving_peek(self, key: str, limit: int, seconds: int,
                     now: float) -> tuple[int, float]:
        times = self._moving_times(key, seconds, now)
        if not times:
            # limits reports its stored window's start + seconds; with nothing in the
            # window that is now + seconds once its expiry sweep has run
            return limit if limit > 0 else 0, now + seconds
        # limits' stats count requests made after now - seconds, its hit refuses while
        # the limit-th newest was made at or after it
        edge = _at_cutoff(times, now - seconds)
        inside = len(times) - edge
        left = 0 if len(times) >= limit else limit - inside
        reset = times[edge] + seconds if inside else now + seconds
        return left, reset

    def _moving_hit(self, key: str, limit: int, seconds: int, now: float,
                    amount: int) -> None:
        times = self._moving_times(key, seconds, now)
        if times is None:
            times = deque()
            self._moving[key] = (seconds, times)
        times.extend([now] * amount)
        while len(times) > limit:   # older ones never decide again (limits keeps limit)
            times.popleft()

    # -- garbage collection --------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._calls += 1
        if self._calls >= SWEEP_EVERY and self._calls >= len(self):
            self._calls = 0
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Drop every window whose time is over at ``now``."""
        fixed = self._fixed
        for key in [k for k, rec in fixed.items() if rec[1] <= now]:
            del fixed[key]
        moving = self._moving
        for key in [k for k, (s, t) in moving.items() if not t or t[-1] < now - s]:
            del moving[key]
        sliding = self._sliding
        for key, slots in list(sliding.items()):
            for index in [i for i, rec in slots.items() if rec[1] <= now]:
                del slots[index]
            if not slots:
                del sliding[key]


def _prev_ttl(prev: int, seconds: int, now: float) -> float:
    """limits' ``previous_ttl``: the previous window's share still inside, in seconds."""
    if prev == 0:
        return 0.0
    return (1 - (((now - seconds) / seconds) % 1)) * seconds


def _at_cutoff(times: deque[float], cutoff: float) -> int:
    """How many of the oldest timestamps (all >= cutoff) are exactly ``cutoff``."""
    n = 0
    for t in times:
        if t != cutoff:
            break
        n += 1
    return n


def _drop_unreadable(slots: dict[int, list[float]], prev_i: int, now: float) -> None:
    """Windows before the previous one, or expired, are never read again (``now`` does
    not go back): at most the previous, current and one in between stay."""
    for index in [i for i, rec in slots.items() if i < prev_i or rec[1] <= now]:
        del slots[index]
