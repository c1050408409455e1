"""Pair evidence found off the request path: near-duplicate prompts and co-activity.

    finder = PairFinder(settings)
    finder.add("acct-1", "Summarise the attached report in five bullet points …", now)
    -> [PairEvidence("acct-1", "acct-7", "prompt_similarity"), …]

**Near-duplicate prompts** (``prompt_similarity: S``). A prompt is lower-cased, split into
words (digit runs read as ``#``, so templated numbers do not matter) and cut into
overlapping word pairs (2-word shingles; Broder 1997, "On the resemblance and
containment of documents"). Its MinHash signature of ``NUM_HASHES`` values estimates the
Jaccard similarity of two prompts' shingle sets; it is computed by one-permutation
hashing with optimal densification (Li, Owen & Zhang 2012; Shrivastava 2017), which
costs one hash per shingle instead of one per shingle and hash function, with the same
estimator. Candidates come from LSH banding (Indyk & Motwani 1998; Leskovec, Rajaraman
& Ullman, *Mining of Massive Datasets* §3.4): ``b`` bands of ``r`` rows of the first
``LSH_HASHES`` values, chosen for S so that a pair at S is a candidate with probability
``LSH_RECALL`` or more (a miss is lost, a candidate only costs a verification) with the
fewest false candidates (``bands_for``), and each candidate is verified by its
estimated similarity (all ``NUM_HASHES`` values) >= S. A new prompt matching
prompts of more than ``max_fanout`` other accounts is a template everybody uses (a
popular SDK's instructions, a homework question) and counts for nobody. A pair gets
``prompt_similarity`` evidence once ``min_pairs`` of their prompts (within the window)
found a near-duplicate from the other account. Prompts of fewer than ``MIN_WORDS``
words are too generic to say anything and are skipped; an account's exact repeats are
stored once.

**Co-activity** (``co_activity: T``). An account's *burst onset* is a request after at
least T seconds of silence. Two onsets coincide when they are at most T apart, unless
more than ``max_fanout`` accounts had an onset within T of the later one (a busy minute
says nothing). An onset is judged once T has passed after it (at the next request of
any account), when its whole span is known: co-activity evidence comes one burst late.
A pair gets ``co_activity`` evidence once at least ``min_events`` of their onsets
coincided within the window and those are at least ``min_share`` of *each* account's
onsets in the window (synchronised accounts start together nearly every time; two busy
strangers do now and then).

Memory is bounded (eviction by time, oldest first): ``max_prompts`` stored prompts
(~4 KB each with their buckets and counters, measured: ~40 MB at the default 10,000),
of which one account keeps at most its ``PROMPTS_PER_ACCOUNT`` most recent (a flood of
one account's junk prompts evicts only its own),
``max_pairs`` pair counters per signal, ``max_accounts`` accounts' onset histories (at
most ``MAX_HISTORY`` times each). Cost: ~0.3 ms per prompt of 10-120 words. Everything is
deterministic: fixed hash keys, insertion-ordered tables, sorted output.
"""

from __future__ import annotations

import hashlib
import random
import re
from array import array
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from functools import lru_cache

from guardproxy.linkage.api import PairEvidence
from guardproxy.linkage.settings import LinkageSettings, SignalSpec

NUM_HASHES = 256          # the estimate's standard error: sqrt(J(1-J)/256) <= 0.031
LSH_HASHES = 128          # the first 128 values are banded: buckets cost memory per band
MAX_BANDS = 16
LSH_RECALL = 0.98         # a pair exactly at the threshold is a candidate this often
SHINGLE_WORDS = 2
MIN_WORDS = 8
MAX_WORDS = 1000          # a prompt's head: the cost of one prompt stays bounded
MAX_HISTORY = 1024        # times kept per counter (counts beyond it are capped)
PROMPTS_PER_ACCOUNT = 200  # an account's most recent prompts kept: one cannot flush others
_M64 = (1 << 64) - 1
_WORD = re.compile(r"\w+")
_DIGITS = re.compile(r"\d+")


def _hash64(data: bytes) -> int:
    # unkeyed and fixed: signatures must agree across processes and runs
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit bijection that spreads every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def shingles(text: str) -> set[int]:
    """The 64-bit hashes of the prompt's 2-word shingles (empty: under ``MIN_WORDS``)."""
    words = _WORD.findall(_DIGITS.sub("#", text.lower()))[:MAX_WORDS]
    if len(words) < MIN_WORDS:
        return set()
    known: dict[str, int] = {}
    hashes = [known.get(w) or known.setdefault(w, _hash64(w.encode("utf-8", "surrogatepass")))
              for w in words]
    out = set()
    for i in range(len(hashes) - SHINGLE_WORDS + 1):
        x = 0
        for h in hashes[i:i + SHINGLE_WORDS]:   # word hashes are random: fold, mix once
            x = (x * 0x9E3779B97F4A7C15 + h) & _M64
        out.add(_mix(x))
    return out


@lru_cache(maxsize=4)
def _probes(k: int) -> tuple[tuple[int, ...], ...]:
    """Per bin, a fixed random order of the bins it may borrow from: the random
    probe sequence of optimal densification, drawn once (seeded) instead of hashed
    per attempt."""
    rng = random.Random(f"guardproxy-linkage-probes-{k}")
    return tuple(tuple(rng.sample(range(k), k)) for _ in range(k))


def signature(hashes: set[int], k: int = NUM_HASHES) -> array[int]:
    """One-permutation MinHash (k bins by ``h % k``, each the minimum of its hashes,
    truncated to 32 bits); an empty bin borrows the value of the first non-empty bin
    in its fixed random probe order (optimal densification). Empty input: an empty
    array."""
    bins: list[int | None] = [None] * k
    for h in hashes:
        i = h % k
        v = h // k
        current = bins[i]
        if current is None or v < current:
            bins[i] = v
    if all(b is None for b in bins):
        return array("I")
    out = array("I", bytes(4 * k))
    probes = _probes(k)
    for i in range(k):
        value = bins[i]
        for j in probes[i]:   # ends: some bin is full
            if value is not None:
                break
            value = bins[j]
        out[i] = (value or 0) & 0xFFFFFFFF
    return out


def similarity(a: array[int], b: array[int]) -> float:
    """The estimated Jaccard similarity of two signatures: the share of equal values."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a) if a and b else 0.0


@lru_cache(maxsize=64)
def bands_for(threshold: float, k: int = LSH_HASHES,
              max_bands: int = MAX_BANDS) -> tuple[int, int]:
    """``(b, r)``: b bands of r rows (b * r <= k, b <= max_bands) that make a pair at
    the threshold a candidate with probability >= ``LSH_RECALL`` (above it, more), with
    the least false-positive area under the S-curve ``1 - (1 - s^r)^b`` below the
    threshold (fewest verifications). None reaching it: the highest recall."""
    def curve(s: float, b: int, r: int) -> float:
        return float(1 - (1 - s**r) ** b)

    def fp_area(b: int, r: int) -> float:
        step = threshold / 100
        return sum(curve((i + 0.5) * step, b, r) for i in range(100)) * step

    options = [(b, r) for b in range(1, max_bands + 1) for r in range(1, k // b + 1)]
    good = [o for o in options if curve(threshold, *o) >= LSH_RECALL]
    if not good:
        return max(options, key=lambda o: (curve(threshold, *o), -o[0]))
    return min(good, key=lambda o: (fp_area(*o), o[0]))


def _trim(times: list[float], horizon: float) -> int:
    """Drop times before ``horizon`` (and beyond ``MAX_HISTORY``); how many are left."""
    cut = max(bisect_left(times, horizon), len(times) - MAX_HISTORY)
    if cut > 0:
        del times[:cut]
    return len(times)


class _Counts:
    """Pair -> times of its recent events (at most ``MAX_HISTORY``), least recently
    updated evicted first beyond ``limit`` pairs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def add(self, key: tuple[str, str], now: float, horizon: float) -> int:
        """Add an event; the pair's events since ``horizon``."""
        times = self.times.get(key)
        if times is None:
            times = self.times[key] = []
            while len(self.times) > self.limit:
                self.times.popitem(last=False)
        else:
            self.times.move_to_end(key)
        insort(times, now)
        return _trim(times, horizon)


class _Prompts:
    def __init__(self, spec: SignalSpec, window: float, max_prompts: int,
                 max_pairs: int, per_account: int = PROMPTS_PER_ACCOUNT) -> None:
        self.spec = spec
        self.window = window
        self.max_prompts = max_prompts
        self.per_account = per_account
        self.mine: dict[str, deque[int]] = {}   # account -> its stored ids, oldest first
        self.bands, self.rows = bands_for(spec.similarity, LSH_HASHES)
        self.bucket_cap = 2 * (spec.fanout + 1)
        # prompt id -> (account, time, signature); ids increase with time
        self.prompts: OrderedDict[int, tuple[str, float, array[int]]] = OrderedDict()
        self.buckets: dict[int, list[int]] = {}     # band key -> ids, one per account
        self.own: dict[tuple[str, int], int] = {}   # (account, signature hash) -> id
        self.counts = _Counts(max_pairs)
        self.next_id = 0

    def _keys(self, sig: array[int]) -> list[int]:
        r = self.rows
        return [hash((band, *sig[band * r:(band + 1) * r])) for band in range(self.bands)]

    def add(self, account: str, text: str, now: float) -> list[PairEvidence]:
        self._expire(now)
        sig = signature(shingles(text))
        if not sig:
            return []
        whole = hash(tuple(sig))
        if (account, whole) in self.own:   # an exact repeat: already counted
            return []
        keys = self._keys(sig)
        matched: set[str] = set()
        checked: set[int] = set()
        for key in keys:
            for pid in self.buckets.get(key, ()):
                other, _, theirs = self.prompts[pid]
                if other == account or other in matched or pid in checked:
                    continue
                checked.add(pid)
                if similarity(sig, theirs) >= self.spec.similarity:
                    matched.add(other)
        self._store(account, now, sig, keys, whole)
        if len(matched) > self.spec.fanout:   # a template everybody uses
            return []
        out = []
        horizon = now - self.window
        for other in sorted(matched):
            a, b = (account, other) if account < other else (other, account)
            if self.counts.add((a, b), now, horizon) >= self.spec.min_pairs:
                out.append(PairEvidence(a, b, "prompt_similarity"))
        return out

    def _store(self, account: str, now: float, sig: array[int], keys: list[int],
               whole: int) -> None:
        pid = self.next_id
        self.next_id += 1
        self.prompts[pid] = (account, now, sig)
        self.own[(account, whole)] = pid
        mine = self.mine.setdefault(account, deque())
        mine.append(pid)
        if len(mine) > self.per_account:
            self._drop(mine[0])
        for key in keys:
            bucket = self.buckets.setdefault(key, [])
            for i, old in enumerate(bucket):   # the account's newest prompt only
                if self.prompts[old][0] == account:
                    del bucket[i]
                    break
            bucket.append(pid)
            if len(bucket) > self.bucket_cap:
                del bucket[0]
        while len(self.prompts) > self.max_prompts:
            self._evict()

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        while self.prompts and next(iter(self.prompts.values()))[1] < horizon:
            self._evict()

    def _evict(self) -> None:
        self._drop(next(iter(self.prompts)))

    def _drop(self, pid: int) -> None:
        account, _, sig = self.prompts.pop(pid)
        mine = self.mine[account]
        mine.remove(pid)   # its oldest, but for a repeat's or a cap's eviction: short
        if not mine:
            del self.mine[account]
        whole = hash(tuple(sig))
        if self.own.get((account, whole)) == pid:
            del self.own[(account, whole)]
        for key in self._keys(sig):
            bucket = self.buckets.get(key)
            if bucket is not None and pid in bucket:
                bucket.remove(pid)
                if not bucket:
                    del self.buckets[key]


class _Bursts:
    """Onsets are settled once their span has closed (``burst`` seconds later, at the
    next request of anyone): only then is it known how many accounts started with
    them. Evidence is therefore one burst late."""

    def __init__(self, spec: SignalSpec, window: float, max_accounts: int,
                 max_pairs: int) -> None:
        self.spec = spec
        self.window = window
        self.max_accounts = max_accounts
        self.last: OrderedDict[str, float] = OrderedDict()    # account -> last request
        # onsets that may still fall in an unsettled span: times (sorted) and accounts,
        # from index ``head`` on (compacted now and then)
        self.times: list[float] = []
        self.accounts: list[str] = []
        self.head = 0
        self.pending: deque[int] = deque()   # absolute indexes of unsettled onsets
        self.base = 0                        # absolute index of times[0]
        self.onsets: OrderedDict[str, list[float]] = OrderedDict()
        self.counts = _Counts(max_pairs)

    def add(self, account: str, now: float) -> list[PairEvidence]:
        burst = self.spec.burst
        out = self._settle(now)
        while self.last and next(iter(self.last.values())) < now - burst:
            self.last.popitem(last=False)
        onset = account not in self.last
        self.last[account] = now
        self.last.move_to_end(account)
        if onset:
            self._onset(account, now, now - self.window)
            if self.times and now < self.times[-1]:   # out of order: keep times sorted
                now = self.times[-1]
            self.pending.append(self.base + len(self.times))
            self.times.append(now)
            self.accounts.append(account)
        return out

    def _settle(self, now: float) -> list[PairEvidence]:
        burst, fanout = self.spec.burst, self.spec.fanout
        horizon = now - self.window
        out = []
        while self.pending and self.times[self.pending[0] - self.base] < now - burst:
            i = self.pending.popleft() - self.base
            t, account = self.times[i], self.accounts[i]
            lo = bisect_left(self.times, t - burst, self.head)
            span: set[str] = set()
            earlier: set[str] = set()
            for j in range(lo, len(self.times)):
                if self.times[j] > t + burst or len(span) > fanout:
                    break
                if self.accounts[j] != account:
                    span.add(self.accounts[j])
                    if j < i:
                        earlier.add(self.accounts[j])
            if len(span) + 1 > fanout:   # a busy span says nothing
                continue
            mine = self._count(account, horizon)
            for other in sorted(earlier):   # each pair once: at its later onset
                a, b = (account, other) if account < other else (other, account)
                together = self.counts.add((a, b), t, horizon)
                if together >= self.spec.min_events and together >= \
                        self.spec.min_share * max(mine, self._count(other, horizon)):
                    out.append(PairEvidence(a, b, "co_activity"))
        oldest = self.times[self.pending[0] - self.base] if self.pending else now
        self.head = bisect_left(self.times, oldest - burst, self.head)
        if self.head > 1024 and self.head * 2 > len(self.times):
            del self.times[:self.head], self.accounts[:self.head]
            self.base += self.head
            self.head = 0
        return out

    def _onset(self, account: str, now: float, horizon: float) -> int:
        times = self.onsets.get(account)
        if times is None:
            times = self.onsets[account] = []
            while len(self.onsets) > self.max_accounts:
                self.onsets.popitem(last=False)
        else:
            self.onsets.move_to_end(account)
        insort(times, now)
        return _trim(times, horizon)

    def _count(self, account: str, horizon: float) -> int:
        times = self.onsets.get(account)
        return _trim(times, horizon) if times is not None else 0


class PairFinder:
    """``add(account, prompt, now)`` -> the pair evidence that request completes (sorted
    within each signal), for the pair signals the settings configure (none: always [])."""

    def __init__(self, settings: LinkageSettings, *, max_prompts: int = 10_000,
                 max_pairs: int = 200_000, max_accounts: int = 100_000) -> None:
        prompt, co = settings.signal("prompt_similarity"), settings.signal("co_activity")
        self.prompts = _Prompts(prompt, settings.window, max_prompts, max_pairs) \
            if prompt is not None else None
        self.bursts = _Bursts(co, settings.window, max_accounts, max_pairs) \
            if co is not None else None

    def add(self, account: str, prompt: str | None, now: float) -> list[PairEvidence]:
        out: list[PairEvidence] = []
        if self.prompts is not None and prompt:
            out += self.prompts.add(account, prompt, now)
        if self.bursts is not None:
            out += self.bursts.add(account, now)
        return out
