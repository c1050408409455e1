"""Quota windows (state/windows.py, state/lua/quota_windows.lua) against ``limits``.

Three implementations run the same random request sequences, step by step:

(a) ``limits`` itself: its async strategies on ``limits.aio.storage.MemoryStorage``, its
    clock (the ``time`` module its storage and strategies read) patched to the test's;
(b) ``MemoryWindows``; (c) the Lua functions on the real Redis.

A request is admitted iff every window of the rule has room for one, and only then
counted in every window. For (a) that is guardproxy's quota composition made atomic:
``get_window_stats`` for every window, then ``hit`` in every window, all taken back
(a storage snapshot) if one ``hit`` refuses. Compared at every step: the decision,
every window's ``remaining`` (exactly) and ``reset`` (exactly: the same float
operations run in all three).

Where ``limits`` contradicts itself, its ``hit`` decides (see state/windows.py): a
window whose stats show room but whose ``hit`` refuses must read ``remaining == 0`` in
ours. ``reset`` of a moving window with nothing in it is ill-defined in ``limits`` (the
start of whatever its background sweep left in the list, or now): ours is
``now + seconds`` there, what ``limits`` reports once its sweep ran.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import limits.aio.storage.memory as limits_memory
import limits.aio.strategies as limits_strategies
import pytest
import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from guardproxy.state.windows import STRATEGY_CODES, MemoryWindows

LUA = (Path(__file__).parent.parent / "guardproxy" / "state" / "lua" /
       "quota_windows.lua").read_text()

# test-only: KEYS one per window; ARGV op, strategy, now, then per window: limit seconds
# ('admit'), or limit seconds amount ('hit'), seconds ('count'), seconds amount ('add').
# Numbers come back as strings: Redis truncates Lua numbers to integers.
DISPATCH = LUA + """
local op, strategy, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
if op == 'admit' then
  local out, room = {'1'}, true
  for w = 1, #KEYS do
    local limit, seconds = tonumber(ARGV[2 + 2 * w]), tonumber(ARGV[3 + 2 * w])
    local left, reset = window_peek(strategy, KEYS[w], limit, seconds, now)
    out[2 * w], out[2 * w + 1] = qw_fmt(left), qw_fmt(reset)
    if left < 1 then room = false end
  end
  if room then
    for w = 1, #KEYS do
      window_hit(strategy, KEYS[w], tonumber(ARGV[2 + 2 * w]), tonumber(ARGV[3 + 2 * w]),
                 now, 1)
    end
  else
    out[1] = '0'
  end
  return out
elseif op == 'hit' then   -- regardless of room
  window_hit(strategy, KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]), now, tonumber(ARGV[6]))
  return 'ok'
elseif op == 'count' then
  return qw_fmt(window_count(strategy, KEYS[1], tonumber(ARGV[4]), now))
end
window_add(strategy, KEYS[1], tonumber(ARGV[4]), now, tonumber(ARGV[5]))
return 'ok'
"""

LIMITERS: dict[str, type[RateLimiter]] = {
    "f": FixedWindowRateLimiter,
    "m": MovingWindowRateLimiter,
    "s": SlidingWindowCounterRateLimiter,
}
UNBOUNDED = 2 ** 53   # guards/quota.py: the carry's limit
WINDOW_SETS = [[(3, 1)], [(5, 2), (20, 10)], [(2, 1), (4, 3), (50, 60)]]
SEEDS = range(12)
STEPS = 300

Outcome = tuple[bool, list[tuple[int, float]]]   # admitted, (remaining, reset) per window


class Clock:
    """Stands in for the ``time`` module ``limits`` reads (``time.time()`` only)."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(limits_memory, "time", clock)
    monkeypatch.setattr(limits_strategies, "time", clock)

    async def no_sweep(self: MemoryStorage) -> None:
        return None

    # limits' background expiry task runs whenever the loop gets control, so what it
    # dropped depends on scheduling: the stale entries behind the moving window's
    # ill-defined empty reset, and a request made exactly `seconds` ago, which its hit
    # counts when the task has not run (our rule, the Redis scripts' too) and not when
    # it has. Off here: limits' strategies on the storage as its calls leave it
    monkeypatch.setattr(MemoryStorage, "_MemoryStorage__schedule_expiry", no_sweep)
    return clock


@dataclass
class Store:
    script: Any     # DISPATCH, registered
    prefix: str     # unique to the test (conftest deletes its keys after)
    client: Any


@pytest.fixture
def store(redis_prefix: tuple[str, str]) -> Iterator[Store]:
    url, prefix = redis_prefix
    client = redis.Redis.from_url(url)
    yield Store(client.register_script(DISPATCH), prefix, client)
    client.close()


# -- the three implementations -----------------------------------------------------------

@dataclass
class Reference:
    """``limits`` itself; ``inconsistent`` counts windows whose stats showed room that
    its hit then refused."""

    strategy: str
    windows: list[tuple[int, int]]
    clock: Clock
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    inconsistent: int = 0

    def __post_init__(self) -> None:
        self.limiter = LIMITERS[self.strategy](self.storage)
        self.items = [RateLimitItemPerSecond(limit, seconds) for limit, seconds in self.windows]

    def _snapshot(self) -> tuple[Any, ...]:
        s = self.storage
        return (Counter(s.storage), dict(s.expirations),
                {k: list(v) for k, v in s.events.items()})

    def _restore(self, snap: tuple[Any, ...]) -> None:
        self.storage.storage, self.storage.expirations, self.storage.events = snap

    async def _would_hit(self, item: RateLimitItem, ident: str) -> bool:
        snap = self._snapshot()
        ok = await self.limiter.hit(item, ident)
        self._restore(snap)
        return ok

    async def admit(self, ident: str, now: float) -> Outcome:
        self.clock.now = now
        windows, admitted = [], True
        for item in self.items:
            stats = await self.limiter.get_window_stats(item, ident)
            ok = await self._would_hit(item, ident)
            assert stats.remaining >= 1 or not ok, "limits hit where its stats show no room"
            if stats.remaining >= 1 and not ok:
                self.inconsistent += 1
            reset = stats.reset_time
            if self.strategy == "m" and stats.remaining == item.amount:
                reset = now + item.get_expiry()   # ill-defined in limits (module docstring)
            windows.append((stats.remaining if ok else 0, reset))
            admitted = admitted and ok
        if admitted:
            for item in self.items:
                assert await self.limiter.hit(item, ident)
        return admitted, windows

    async def count(self, ident: str, now: float) -> list[int]:
        """Per window, what guards/quota.py ``carry`` reads for a source key."""
        self.clock.now = now
        out = []
        for item in self.items:
            key, expiry = item.key_for(ident), item.get_expiry()
            if self.strategy == "s":
                prev, prev_ttl, current, _ = await self.storage.get_sliding_window(key, expiry)
                out.append(math.floor(prev * prev_ttl / expiry + current))
            else:
                out.append(await self.storage.get(key))
        return out

    async def add(self, ident: str, now: float, amounts: list[int]) -> None:
        """Per window, what guards/quota.py ``carry`` adds to a target key."""
        self.clock.now = now
        for item, amount in zip(self.items, amounts, strict=True):
            key, expiry = item.key_for(ident), item.get_expiry()
            if self.strategy == "s":
                assert await self.storage.acquire_sliding_window_entry(
                    key, UNBOUNDED, expiry, amount)
            else:
                await self.storage.incr(key, expiry, amount=amount)


@dataclass
class Ours:
    """``MemoryWindows`` and the Lua functions, side by side."""

    strategy: str
    windows: list[tuple[int, int]]
    script: Any
    prefix: str
    memory: MemoryWindows = field(default_factory=MemoryWindows)

    def _key(self, ident: str, seconds: int) -> str:
        return f"{{{self.prefix}}}:{ident}:{self.strategy}{seconds}"

    def admit_memory(self, ident: str, now: float) -> Outcome:
        s, mem = self.strategy, self.memory
        windows = [mem.peek(s, self._key(ident, sec), limit, sec, now)
                   for limit, sec in self.windows]
        room = all(left >= 1 for left, _ in windows)
        if room:
            for limit, sec in self.windows:
                mem.hit(s, self._key(ident, sec), limit, sec, now, 1)
        return room, windows

    def admit_redis(self, ident: str, now: float) -> Outcome:
        args: list[Any] = ["admit", self.strategy, repr(now)]
        for limit, sec in self.windows:
            args += [limit, sec]
        out = self.script(keys=[self._key(ident, sec) for _, sec in self.windows], args=args)
        return out[0] == b"1", [(int(out[i]), float(out[i + 1]))
                                for i in range(1, len(out), 2)]

    def count(self, ident: str, now: float) -> tuple[list[int], list[int]]:
        mem = [self.memory.count(self.strategy, self._key(ident, sec), sec, now)
               for _, sec in self.windows]
        red = [int(self.script(keys=[self._key(ident, sec)],
                               args=["count", self.strategy, repr(now), sec]))
               for _, sec in self.windows]
        return mem, red

    def add(self, ident: str, now: float, amounts: list[int]) -> None:
        for (_, sec), amount in zip(self.windows, amounts, strict=True):
            self.memory.add(self.strategy, self._key(ident, sec), sec, now, amount)
            self.script(keys=[self._key(ident, sec)],
                        args=["add", self.strategy, repr(now), sec, amount])


async def compare(ref: Reference, ours: Ours, ident: str, now: float, where: str) -> Outcome:
    expected = await ref.admit(ident, now)
    assert ours.admit_memory(ident, now) == expected, f"memory differs from limits {where}"
    assert ours.admit_redis(ident, now) == expected, f"Lua differs from limits {where}"
    return expected


# -- random sequences --------------------------------------------------------------------

class Times:
    """The test's clock: random steps from a start of one of several kinds, paced for
    one window of the rule (the focus: a seed's sequence fills that window up)."""

    def __init__(self, rng: random.Random, windows: list[tuple[int, int]]) -> None:
        self.rng = rng
        self.limit, self.seconds = rng.choice(windows)
        # a whole second, a random instant, or a small clock (finer float steps: the
        # sliding window's rounding corners live there)
        self.now = rng.choice([1_700_000_000.0, 1_700_000_000.0 + rng.random() * 1000,
                               1000.0, 1000.0 + rng.random() * 100])
        self.seen: list[float] = []   # recent request times

    def next(self) -> float:
        """Mostly a little faster than the focus window allows, with zero and tiny
        steps, exact window lengths after an earlier request (its window ends exactly
        then), exact multiples and fractions of the window, and large jumps."""
        rng, seconds = self.rng, self.seconds
        r = rng.random()
        if r < 0.12:
            step = 0.0
        elif r < 0.20:
            step = rng.choice([1e-9, 1e-6, 1e-3])   # 1e-9 is below 1.7e9's float step
        elif r < 0.25:
            # exactly a window after an earlier request, if that is still ahead
            step = max(0.0, rng.choice(self.seen[-8:] or [self.now]) + seconds - self.now)
        elif r < 0.27:
            step = seconds * rng.choice([1, 2, 0.5, 0.25])
        elif r < 0.99:
            step = rng.random() * 1.6 * seconds / self.limit
        else:
            step = rng.choice([seconds * rng.uniform(1, 4), 86_400.0 * rng.randint(1, 3)])
        self.now += step
        self.seen = [*self.seen[-8:], self.now]
        return self.now


@pytest.mark.parametrize("windows", WINDOW_SETS, ids=lambda w: repr(w).replace(" ", ""))
@pytest.mark.parametrize("strategy", ["f", "m", "s"])
async def test_random_requests_decide_as_limits_does(
        clock: Clock, store: Store, strategy: str,
        windows: list[tuple[int, int]]) -> None:
    script, prefix = store.script, store.prefix
    admitted = inconsistent = 0
    full = [0] * len(windows)
    for seed in SEEDS:
        rng = random.Random(seed * 1000 + 17)
        ref = Reference(strategy, windows, clock)
        ours = Ours(strategy, windows, script, f"{prefix}-{seed}")
        times = Times(rng, windows)
        for step in range(STEPS):
            now = times.next()
            ident = "a" if rng.random() < 0.85 else "b"
            ok, stats = await compare(ref, ours, ident, now, f"(seed {seed}, step {step})")
            admitted += ok
            full = [n + (left == 0) for n, (left, _) in zip(full, stats, strict=True)]
        inconsistent += ref.inconsistent
    # not vacuous: both outcomes were seen many times, and every window was full
    assert 0.2 < admitted / (len(SEEDS) * STEPS) < 0.95
    assert min(full) > 10, full
    if strategy == "m" and windows == [(3, 1)]:   # there it is reached dozens of times
        assert inconsistent > 0, "the moving window's boundary instant was reached"


@pytest.mark.parametrize("windows", WINDOW_SETS[1:], ids=lambda w: repr(w).replace(" ", ""))
@pytest.mark.parametrize("strategy", ["f", "s"])
async def test_count_and_add_carry_as_quota_carry_does(
        clock: Clock, store: Store, strategy: str,
        windows: list[tuple[int, int]]) -> None:
    """Requests on a chain of source ids, each carried once into one target (as
    guards/quota.py ``carry`` does with ``limits``: read the source's count, add it to
    the target), requests on the target in between, all compared step by step."""
    script, prefix = store.script, store.prefix
    carried = 0
    for seed in SEEDS:
        rng = random.Random(seed * 7919 + 3)
        ref = Reference(strategy, windows, clock)
        ours = Ours(strategy, windows, script, f"{prefix}-c{seed}")
        times, source = Times(rng, windows), 0
        for step in range(STEPS):
            now = times.next()
            where = f"(seed {seed}, step {step})"
            if rng.random() < 0.1:
                expected = await ref.count(f"s{source}", now)
                mem, red = ours.count(f"s{source}", now)
                assert mem == expected and red == expected, f"count {where}"
                amounts = [n if n > 0 else 0 for n in expected]
                if any(amounts):
                    await ref.add("t", now, amounts)
                    ours.add("t", now, amounts)
                    carried += sum(amounts)
                source += 1
            else:
                ident = rng.choice([f"s{source}", "t"])
                await compare(ref, ours, ident, now, where)
            expected = await ref.count("t", now)
            assert ours.count("t", now) == (expected, expected), f"target count {where}"
    assert carried > 100


# -- the corners where limits contradicts itself -----------------------------------------

async def test_moving_window_boundary_instant(clock: Clock, store: Store) -> None:
    """Two requests at t, 2/second: at exactly t + 1 limits' stats count neither (they
    count requests made after now - 1) but its hit counts both and refuses."""
    script, prefix = store.script, store.prefix
    ref, ours = Reference("m", [(2, 1)], clock), Ours("m", [(2, 1)], script, prefix)
    t = 1_700_000_000.0
    assert (await compare(ref, ours, "a", t, "first"))[0]
    assert (await compare(ref, ours, "a", t, "second"))[0]
    assert not (await compare(ref, ours, "a", t + 0.5, "full"))[0]
    assert not (await compare(ref, ours, "a", t + 1, "the boundary instant"))[0]
    assert ref.inconsistent == 1
    stats = await ref.limiter.get_window_stats(ref.items[0], "a")
    assert stats.remaining == 2, "limits' stats show room here"
    assert ours.admit_memory("a", t + 1)[1][0][0] == 0
    assert (await compare(ref, ours, "a", t + 1.001, "just after"))[0]


async def test_sliding_window_rounding_corner(clock: Clock, store: Store) -> None:
    """32/minute, 5 requests in [900, 960), 31 in [960, 1020): at 1008 the weighted count
    is 0.9999999999999964 + 31, so limits' stats show 1 left, but 1 + 31 + 1 rounds to
    33 after counting and its hit takes the request back."""
    script, prefix = store.script, store.prefix
    ref, ours = Reference("s", [(32, 60)], clock), Ours("s", [(32, 60)], script, prefix)
    for now, n in [(900.0, 5), (960.0, 27), (1000.0, 3), (1007.0, 1)]:
        for i in range(n):
            assert (await compare(ref, ours, "a", now, f"{now} #{i}"))[0]
    assert not (await compare(ref, ours, "a", 1008.0, "the corner"))[0]
    assert ref.inconsistent == 1


# -- bounds ------------------------------------------------------------------------------

async def test_moving_window_keeps_at_most_limit_entries(store: Store) -> None:
    script, prefix = store.script, store.prefix
    client = store.client
    limit, seconds, now = 5, 10, 1_700_000_000.0
    mem = MemoryWindows()
    key = f"{{{prefix}}}:m"
    for i in range(200):   # hits regardless of room: the store still keeps limit
        mem.hit("m", key, limit, seconds, now + i * 0.01, 1)
        script(keys=[key], args=["hit", "m", repr(now + i * 0.01), limit, seconds, 1])
        assert len(mem._moving[key][1]) <= limit
        assert client.zcard(key) <= limit
    mem.hit("m", key, limit, seconds, now, 7)   # more at once than the limit
    assert len(mem._moving[key][1]) == limit
    # a window later only what is inside stays
    big = 1000
    for i in range(big):
        mem.hit("m", key + "b", big, seconds, now + i * 0.001, 1)
    mem.hit("m", key + "b", big, seconds, now + seconds + 0.5, 1)
    assert len(mem._moving[key + "b"][1]) == 1 + 500
    script(keys=[key], args=["hit", "m", repr(now), limit, seconds, 7])
    assert client.zcard(key) == limit
    assert 0 < client.ttl(key) <= 2 * seconds + 60, "Redis data expire (garbage only)"


def test_sliding_window_keeps_at_most_three_windows(store: Store) -> None:
    script, prefix = store.script, store.prefix
    client = store.client
    mem, key, now = MemoryWindows(), f"{{{prefix}}}:s", 1_700_000_000.0
    for i in range(100):
        t = now + i * 0.7
        mem.hit("s", key, 1000, 1, t, 1)
        script(keys=[key], args=["add", "s", repr(t), 1, 1])
        assert len(mem._sliding[key]) <= 3
        assert client.hlen(key) <= 6


def test_memory_sweep_drops_expired_windows() -> None:
    mem, now = MemoryWindows(), 1_700_000_000.0
    for strategy in "fms":
        for i in range(3000):
            mem.hit(strategy, f"{strategy}{i}", 10, 60, now, 1)
    assert len(mem) == 9000
    later = now + 1000
    for _ in range(9000):
        mem.peek("f", "other", 10, 60, later)
    assert len(mem) == 0, "a sweep ran, within max(4096, keys held) calls"


def test_strategy_codes_and_unknown_strategies() -> None:
    assert STRATEGY_CODES == {"fixed-window": "f", "moving-window": "m",
                              "sliding-window": "s"}
    mem = MemoryWindows()
    with pytest.raises(ValueError):
        mem.peek("x", "k", 1, 1, 0.0)
    with pytest.raises(ValueError):
        mem.add("m", "k", 1, 0.0, 1)


def test_lua_file_is_only_local_functions() -> None:
    """It is prepended to other scripts: no top-level code."""
    depth = 0
    for line in LUA.splitlines():
        if depth == 0 and line and not line.startswith("--"):
            assert line.startswith("local function "), line
        if line.startswith("local function "):
            depth = 1
        elif line == "end":
            depth = 0

