"""The output ledger: fingerprints of every marked response, with who received it.

A leaked text is looked up without relying on any mark. Each response is stored as
its winnowed word k-gram fingerprints (``fingerprint``: Schleimer, Wilkerson & Aiken,
SIGMOD 2003, as in MOSS) with account, request id, time and word count. Matching
fingerprints the leak the same way, looks each fingerprint up in the store's index,
groups the hits by response and reports, per response, the fingerprints shared, the
span of the leak they cover, an excerpt, and the p-value of a chance match.

Found whatever the line breaks, whitespace, case, markdown, typography or canary word
choices: any run of >= 50 normalised words copied from a response (an excerpt from the
middle, several answers pasted onto one line, re-wrapped or markdown-stripped text),
and any copied sentence of >= 8 words that keeps its end punctuation (so every other
sentence copied is found too). Shorter copies may be found; none is promised.

**p of a chance match** (for a response R that shares ``s`` fingerprints with the
leak): under the null "R is unrelated to the leak", each distinct fingerprint ``f`` of
the leak is in R with probability ``q_f = (n_f - [f in R] + 1) / (N + 1)``: ``n_f`` the
recorded responses holding ``f``, ``N`` all responses — the share of the *other*
responses that hold it, add-one smoothed (a phrase seen nowhere else still counts as
1 in N + 1: the ledger cannot show it rarer). A common phrase (large ``n_f``) thus
weighs little; one held by more than ``common`` responses (default 1,000; MOSS's
``-m``) is ignored altogether. Hits whose k-grams overlap in the leak share words, so
they count as one event. ``p = P(Poisson(lambda) >= events)`` with ``lambda`` the sum
of ``q_f`` over the leak's fingerprints: the expected number of chance hits; the
Poisson tail bounds the Poisson-binomial one from above for ``events >= lambda + 1``
(Hoeffding 1956; Anderson & Samuels 1967). ``p_ledger = min(1, N * p)`` corrects for
having looked at all N responses (Bonferroni). With few responses recorded no p is
small: the ledger cannot tell a rare phrase from a common one. Fingerprints that do not
overlap are taken as independent, which they are not inside boilerplate that several
responses share: for such a passage p is optimistic, but its large ``q_f`` keep
``p_ledger`` weak. A small p says the leak was not written independently of R, not
that it was copied *from* R: public text R itself quoted (a licence, a famous
passage) matches every other copy of it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardproxy.canary.fingerprint import (
    DEFAULT,
    Fingerprinter,
    Fingerprints,
    K,
    W,
    Words,
    words,
)
from guardproxy.canary.ledger_sqlite import SqliteLedger
from guardproxy.canary.ledger_stores import (
    Ledger,
    LedgerEntry,
    Lookup,
    MemoryLedger,
    RedisLedger,
)
from guardproxy.policy.values import parse_duration

__all__ = ["COMMON", "LIMIT", "SCHEME", "Ledger", "LedgerEntry", "Lookup", "Match",
           "MemoryLedger", "RedisLedger", "SqliteLedger", "fingerprint_entry",
           "ledger_entry", "match", "open_ledger", "parse_max_age"]

SCHEME = f"winnow-words-v2 k={K} w={W} sentence-minima karp-rabin"
COMMON = 1000          # fingerprints in more responses than this are ignored (MOSS -m)
LIMIT = 20             # matches reported, most significant first
EXCERPT_WORDS = 24
THREAD_CHARS = 8_000   # fingerprint longer texts (~1,300 words, ~2 ms) in a worker thread


def ledger_entry(text: str, account: str, request_id: str, when: float,
                 fingerprinter: Fingerprinter = DEFAULT) -> LedgerEntry:
    found = fingerprinter.fingerprints(text)
    return LedgerEntry(account, request_id, when, found.words, found.hashes, found.positions)


async def fingerprint_entry(text: str, account: str, request_id: str,
                            when: float) -> LedgerEntry:
    """:func:`ledger_entry`, in a worker thread for long texts (about 1 ms of CPU per
    500 words)."""
    if len(text) > THREAD_CHARS:
        return await asyncio.to_thread(ledger_entry, text, account, request_id, when)
    return ledger_entry(text, account, request_id, when)


def parse_max_age(value: Any) -> float:
    """A ledger's ``max_age`` in seconds: ``90d`` (days, up to 3650) or any policy
    duration (``72h``, ``30m``, a number of seconds). ValueError with the reason."""
    days = re.fullmatch(r"\s*(\d{1,4})\s*d\s*", value) if isinstance(value, str) else None
    if days is None:
        return parse_duration(value)
    if not 0 < int(days.group(1)) <= 3650:
        raise ValueError(f"must be between 1d and 3650d, got {value!r}")
    return int(days.group(1)) * 86400.0


def open_ledger(store: str, *, state_uri: str, key_prefix: str, redis_client: Any | None,
                max_entries: int, path: Path | None, max_age: float | None = None) -> Ledger:
    """``store``: ``file`` (SQLite at ``path``) or ``state`` (Redis when the state is
    Redis, else in-process memory)."""
    if store == "file":
        if path is None:
            raise ValueError("a file ledger needs a path")
        return SqliteLedger(path, max_entries, max_age, SCHEME)
    if state_uri.startswith("memory://") or redis_client is None:
        return MemoryLedger(max_entries, max_age)
    return RedisLedger(redis_client, key_prefix, max_entries, max_age)


@dataclass(frozen=True)
class Match:
    entry: LedgerEntry
    shared: int                        # distinct fingerprints the leak shares with it
    events: int                        # the same, overlapping k-grams counted once
    leak_span: tuple[int, int]         # words [start, end) of the leak they cover
    response_span: tuple[int, int]     # words [start, end) of the response
    excerpt: str                       # the leak's text over leak_span, shortened
    log10_p: float                     # chance match with this response
    log10_p_ledger: float              # … with any of the ledger's responses

    def as_dict(self) -> dict[str, object]:
        e = self.entry
        return {"account": e.account, "request_id": e.request_id,
                "request": e.request_id,  # the name before request_id; kept for old tools
                "time": e.time, "response_words": e.words, "shared": self.shared,
                "leak_span": list(self.leak_span),
                "matched_words": self.leak_span[1] - self.leak_span[0],
                "response_span": list(self.response_span), "excerpt": self.excerpt,
                "log10_p": round(self.log10_p, 2),
                "log10_p_ledger": round(self.log10_p_ledger, 2)}


def log10_poisson_tail(lam: float, s: int) -> float:
    """log10 P(X >= s) for X ~ Poisson(lam)."""
    if s <= 0:
        return 0.0
    if lam <= 0.0:
        return -math.inf
    if s > lam:  # P = e^-lam lam^s / s! * sum_n lam^n / ((s+1)…(s+n)), terms shrinking
        term = total = 1.0
        n = 0
        while term > 1e-17 * total:
            n += 1
            term *= lam / (s + n)
            total += term
        log_p = -lam + s * math.log(lam) - math.lgamma(s + 1) + math.log(total)
    else:
        below = sum(math.exp(-lam + i * math.log(lam) - math.lgamma(i + 1)) for i in range(s))
        log_p = math.log(max(1.0 - below, 1e-300))
    return min(0.0, log_p / math.log(10))


def _excerpt(text: str, spans: tuple[tuple[int, int], ...], start: int, end: int) -> str:
    """The leak's text over words [start, end), widened to whitespace, shortened."""
    begin, stop = spans[start][0], spans[end - 1][1]
    while begin > 0 and not text[begin - 1].isspace():
        begin -= 1
    while stop < len(text) and not text[stop].isspace():
        stop += 1
    chunk = text[begin:stop].split()
    if len(chunk) <= EXCERPT_WORDS:
        return " ".join(chunk)
    return " ".join(chunk[:16]) + " … " + " ".join(chunk[-6:])


def _read(text: str, fingerprinter: Fingerprinter) -> tuple[Words, Fingerprints]:
    found = words(text, spans=True)
    return found, fingerprinter.of_words(found)


async def match(ledger: Ledger, text: str, *, common: int = COMMON, limit: int = LIMIT,
                fingerprinter: Fingerprinter = DEFAULT,
                now: float | None = None) -> list[Match]:
    """The recorded responses ``text`` shares fingerprints with, most significant
    first (at most ``limit``). See the module docstring for p."""
    if len(text) > THREAD_CHARS:  # CPU work: keep long texts off the event loop
        found, prints = await asyncio.to_thread(_read, text, fingerprinter)
    else:
        found, prints = _read(text, fingerprinter)
    if not prints.hashes:
        return []
    at = dict(zip(prints.hashes, prints.positions, strict=True))
    hits = await ledger.lookup(prints.hashes, common)
    n = hits.total
    if n == 0 or not hits.postings:
        return []
    counted = [fp for fp in prints.hashes if hits.counts.get(fp, 0) <= common]
    base = sum(hits.counts.get(fp, 0) + 1 for fp in counted)
    by_key: dict[str, list[int]] = {}
    for fp, keys in hits.postings.items():
        for key in keys:
            by_key.setdefault(key, []).append(fp)
    k = fingerprinter.k
    scored: list[tuple[float, str, list[int], int]] = []
    for key, fps in by_key.items():
        fps.sort(key=at.__getitem__)
        events = 1 + sum(at[b] - at[a] >= k for a, b in itertools.pairwise(fps))
        lam = (base - len(fps)) / (n + 1)
        scored.append((log10_poisson_tail(lam, events), key, fps, events))
    scored.sort(key=lambda row: (row[0], -len(row[2])))
    top = scored[:limit]
    entries = await ledger.fetch([key for _, key, _, _ in top])
    now = time.time() if now is None else now
    out = []
    for log_p, key, fps, events in top:
        entry = entries.get(key)
        if entry is None or not ledger.fresh(entry, now):
            continue
        where = dict(zip(entry.fingerprints, entry.positions, strict=True))
        theirs = [where[fp] for fp in fps if fp in where]
        span = (at[fps[0]], min(len(found.tokens), at[fps[-1]] + k))
        out.append(Match(entry, len(fps), events, span,
                         (min(theirs, default=0), max(theirs, default=-k) + k),
                         _excerpt(text, found.spans, *span), log_p,
                         min(0.0, log_p + math.log10(n))))
    return out

