"""Where the output ledger keeps its entries: an in-process ring, or Redis.

Every store keeps, per recorded response, a :class:`LedgerEntry` and an index from each
of its fingerprints to the entries holding it, so a lookup touches only the leaked
text's fingerprints, never the whole ledger. Retention is bounded by ``max_entries``
and optionally ``max_age`` (seconds): the oldest entries go first, with their
fingerprints. The file store, for large ledgers, is in ``ledger_sqlite``.
"""

from __future__ import annotations

import array
import collections
import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeAlias

from redis.exceptions import RedisError

from guardproxy.errors import StoreError


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One recorded response: who got it, when, and its fingerprints (distinct 64-bit
    hashes, each with the index of the word where its k-gram starts)."""
    account: str
    request_id: str
    time: float                         # Unix seconds
    words: int                          # normalised words in the response
    fingerprints: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"account": self.account, "request_id": self.request_id,
                           "time": self.time, "words": self.words,
                           "fps": [f"{h:016x}" for h in self.fingerprints],
                           "pos": list(self.positions)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LedgerEntry:
        d = json.loads(text)
        return cls(d["account"], d["request_id"], float(d["time"]), int(d["words"]),
                   tuple(int(h, 16) for h in d.get("fps", ())),
                   tuple(int(p) for p in d.get("pos", ())))


@dataclass(frozen=True)
class Lookup:
    """What the ledger holds for a set of fingerprints.

    ``total``: responses in the ledger; ``counts``: for each fingerprint found, how many
    responses hold it; ``postings``: the keys of those responses, only for fingerprints
    held by at most ``common`` responses (the rest are common phrases: counted, not
    listed)."""
    total: int
    counts: dict[int, int] = field(default_factory=dict)
    postings: dict[int, tuple[str, ...]] = field(default_factory=dict)


class Ledger(ABC):
    max_entries: int
    max_age: float | None

    @abstractmethod
    async def record(self, entry: LedgerEntry) -> None:
        """Store one response, evicting what falls outside the retention bounds."""

    @abstractmethod
    async def lookup(self, fingerprints: Sequence[int], common: int) -> Lookup: ...

    @abstractmethod
    async def fetch(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        """The entries under ``keys`` (keys from :meth:`lookup`); missing ones left out."""

    @abstractmethod
    def entries(self) -> AsyncIterator[LedgerEntry]:
        """Every entry, oldest first (export and tests; matching never scans)."""

    def fresh(self, entry: LedgerEntry, now: float) -> bool:
        return self.max_age is None or entry.time >= now - self.max_age

    async def aclose(self) -> None:
        return None


_Kept: TypeAlias = "tuple[str, str, float, int, array.array[int], array.array[int]]"


def _keep(entry: LedgerEntry) -> _Kept:
    """An entry with its fingerprints and positions packed (8 + 4 bytes each, not two
    int objects): the index's keys are the only int objects left per fingerprint."""
    return (entry.account, entry.request_id, entry.time, entry.words,
            array.array("Q", entry.fingerprints), array.array("I", entry.positions))


def _unkeep(kept: _Kept) -> LedgerEntry:
    account, request_id, when, words, fps, pos = kept
    return LedgerEntry(account, request_id, when, words, tuple(fps), tuple(pos))


class MemoryLedger(Ledger):
    """In-process: entries in insertion order (packed), and fingerprint -> entry
    sequence numbers (one int when a fingerprint is in one entry, the usual case, else
    a list). About 110 bytes per fingerprint: 4 KB per 500-word response."""

    def __init__(self, max_entries: int, max_age: float | None = None) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.ring: collections.OrderedDict[int, _Kept] = collections.OrderedDict()
        self.index: dict[int, int | list[int]] = {}
        self.next_seq = 0

    async def record(self, entry: LedgerEntry) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.ring[seq] = _keep(entry)
        index = self.index
        for fp in entry.fingerprints:
            held = index.get(fp)
            if held is None:
                index[fp] = seq
            elif isinstance(held, int):
                index[fp] = [held, seq]
            else:
                held.append(seq)
        self._evict(entry.time)

    def _evict(self, now: float) -> None:
        cutoff = -math.inf if self.max_age is None else now - self.max_age
        while self.ring:
            seq, oldest = next(iter(self.ring.items()))
            if len(self.ring) <= self.max_entries and oldest[2] >= cutoff:
                return
            del self.ring[seq]
            for fp in oldest[4]:
                held = self.index.get(fp)
                if held == seq:
                    del self.index[fp]
                elif isinstance(held, list):
                    held.remove(seq)
                    if len(held) == 1:
                        self.index[fp] = held[0]

    async def lookup(self, fingerprints: Sequence[int], common: int) -> Lookup:
        out = Lookup(total=len(self.ring))
        for fp in fingerprints:
            held = self.index.get(fp)
            if held is None:
                continue
            seqs = [held] if isinstance(held, int) else held
            out.counts[fp] = len(seqs)
            if len(seqs) <= common:
                out.postings[fp] = tuple(str(s) for s in seqs)
        return out

    async def fetch(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        return {key: _unkeep(self.ring[int(key)]) for key in keys if int(key) in self.ring}

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        for kept in list(self.ring.values()):
            yield _unkeep(kept)


def _record_script() -> str:
    return resources.files("guardproxy.canary").joinpath("lua/ledger_record.lua") \
        .read_text("utf-8")


class RedisLedger(Ledger):
    """Redis, Sentinel or Cluster. Keys, all under one hash tag (one Cluster slot: the
    Redis ledger is for small deployments; large ones use the file store)::

        <base>:e          hash   sequence number -> entry JSON (with its fingerprints)
        <base>:seq / :lo  the last sequence number given / the oldest one still kept
        <base>:f:<hhhh>   hash   fingerprint (16 hex digits) -> "seq seq …", bucketed
                                 by its first 16 bits so each bucket stays a compact
                                 listpack

    with ``<base>`` = ``<prefix>:ledger:{<prefix>}``. Recording is one ``EVALSHA``
    (``lua/ledger_record.lua``): it stores the entry and its postings and evicts the
    oldest entries (at most 64 per call) while more than ``max_entries`` are kept or
    the oldest is older than ``max_age`` — exact bounds, atomic, one round trip.
    A lookup is one pipeline (the buckets' fields and ``HLEN``), a fetch one ``HMGET``.
    About 2.3-2.8 KB of Redis memory per 500-word response (measured at 2·10^4 and
    3·10^3 responses: fuller buckets are denser).
    """

    def __init__(self, client: Any, prefix: str, max_entries: int,
                 max_age: float | None = None) -> None:
        self.client = client
        self.base = f"{prefix}:ledger:{{{prefix}}}"
        self.max_entries = max_entries
        self.max_age = max_age
        self._record = client.register_script(_record_script())

    def _bucket(self, fp_hex: str) -> str:
        return f"{self.base}:f:{fp_hex[:4]}"

    async def record(self, entry: LedgerEntry) -> None:
        fps = [f"{h:016x}" for h in entry.fingerprints]
        try:
            await self._record(keys=[self.base], args=[
                entry.to_json(), entry.time, self.max_entries, self.max_age or 0, *fps])
        except RedisError as exc:
            raise StoreError(f"ledger store unavailable: {exc}") from exc

    async def lookup(self, fingerprints: Sequence[int], common: int) -> Lookup:
        hexes = [f"{h:016x}" for h in fingerprints]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hlen(f"{self.base}:e")
                for fp in hexes:
                    pipe.hget(self._bucket(fp), fp)
                total, *held = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"ledger store unavailable: {exc}") from exc
        out = Lookup(total=int(total))
        for h, raw in zip(fingerprints, held, strict=True):
            if raw is None:
                continue
            seqs = raw.decode().split()
            out.counts[h] = len(seqs)
            if len(seqs) <= common:
                out.postings[h] = tuple(seqs)
        return out

    async def fetch(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        if not keys:
            return {}
        try:
            raws = await self.client.hmget(f"{self.base}:e", list(keys))
        except RedisError as exc:
            raise StoreError(f"ledger store unavailable: {exc}") from exc
        return {key: LedgerEntry.from_json(raw)
                for key, raw in zip(keys, raws, strict=True) if raw is not None}

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        try:
            found = [(int(seq), raw) async for seq, raw in
                     self.client.hscan_iter(f"{self.base}:e", count=1000)]
        except RedisError as exc:
            raise StoreError(f"ledger store unavailable: {exc}") from exc
        for _, raw in sorted(found):
            yield LedgerEntry.from_json(raw)
