"""The output ledger: a SimHash of every marked response, with who received it.

A leaked passage can then be looked up without relying on any mark: pieces whose
64-bit SimHash is within a few bits of a recorded response, or of one of its
paragraphs, point at the account and request. A leak is cut into pieces at blank lines
and, since copied answers are often pasted one per line, at single line breaks too.
Stores: a bounded in-process ring (``memory://`` state), a Redis stream trimmed to
``max_entries`` (one XADD per response), or a JSON-lines file. Matching scans the
ledger linearly (a popcount per hash: about a second per million entries).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from guardproxy.errors import StoreError

_WORDS = re.compile(r"[a-z0-9]+")


# Each digest byte value spread into 8 lanes of 32 bits, one lane per bit: summing the
# spread values of all shingles counts, per bit position, how many hashes set it, with
# big-integer additions instead of a Python loop over 64 bits per shingle (~20x faster).
_LANE = 32
_LANE_MASK = (1 << _LANE) - 1
_SPREAD = tuple(sum(((value >> i) & 1) << (_LANE * i) for i in range(8)) for value in range(256))


def simhash64(text: str) -> int:
    """Charikar's SimHash over word 3-shingles: near-duplicate texts differ in few bits."""
    words = _WORDS.findall(text.lower())
    shingles = [" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))] \
        if len(words) >= 3 else words
    digests = [hashlib.blake2b(s.encode(), digest_size=8).digest() for s in shingles]
    result, n = 0, len(digests)
    # zip(*digests): column k holds byte k of every digest; big-endian, so byte k holds
    # bits 8*(7-k) .. 8*(7-k)+7 of the hash
    for k, column in enumerate(zip(*digests, strict=True)):
        counts = sum(map(_SPREAD.__getitem__, column))
        for i in range(8):
            if 2 * ((counts >> (_LANE * i)) & _LANE_MASK) > n:  # majority of hashes set it
                result |= 1 << (8 * (7 - k) + i)
    return result


def paragraphs(text: str, min_words: int = 20) -> list[str]:
    out: list[str] = []
    pending = ""
    for block in re.split(r"\n\s*\n", text):
        pending = f"{pending}\n\n{block}" if pending else block
        if len(pending.split()) >= min_words:
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


MAX_PARTS = 32  # paragraph hashes kept per response


def pieces(text: str) -> list[str]:
    """A leaked text's pieces: its paragraphs, then its long lines that are not one."""
    out = paragraphs(text)
    seen = set(out)
    for line in text.splitlines():
        line = line.strip()
        if len(line.split()) >= 20 and line not in seen:
            seen.add(line)
            out.append(line)
    return out


def paragraph_hashes(text: str) -> tuple[int, ...]:
    """SimHashes of a response's paragraphs, when it has more than one."""
    parts = paragraphs(text)
    return tuple(simhash64(p) for p in parts[:MAX_PARTS]) if len(parts) > 1 else ()


@dataclass(frozen=True)
class LedgerEntry:
    simhash: int                    # the whole response
    account: str
    request_id: str
    time: float
    words: int
    parts: tuple[int, ...] = ()     # each of its paragraphs

    def to_json(self) -> str:
        return json.dumps({"simhash": f"{self.simhash:016x}", "account": self.account,
                           "request_id": self.request_id, "time": self.time,
                           "words": self.words, "parts": [f"{h:016x}" for h in self.parts]})

    @classmethod
    def from_json(cls, text: str | bytes) -> LedgerEntry:
        d = json.loads(text)
        return cls(int(d["simhash"], 16), d["account"], d["request_id"], float(d["time"]),
                   int(d["words"]), tuple(int(h, 16) for h in d.get("parts", ())))

    def distance(self, simhash: int) -> int:
        return min((simhash ^ h).bit_count() for h in (self.simhash, *self.parts))


class Ledger(ABC):
    @abstractmethod
    async def record(self, entry: LedgerEntry) -> None: ...

    @abstractmethod
    def entries(self) -> AsyncIterator[LedgerEntry]: ...

    async def aclose(self) -> None:
        return None


class MemoryLedger(Ledger):
    def __init__(self, max_entries: int) -> None:
        self.ring: collections.deque[LedgerEntry] = collections.deque(maxlen=max_entries)

    async def record(self, entry: LedgerEntry) -> None:
        self.ring.append(entry)

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        for entry in list(self.ring):
            yield entry


class RedisLedger(Ledger):
    def __init__(self, client: Any, key: str, max_entries: int) -> None:
        self.client = client
        self.key = key
        self.max_entries = max_entries

    async def record(self, entry: LedgerEntry) -> None:
        try:
            # exact MAXLEN: one eviction per add is cheap, and "~" would let a small bound
            # be overrun by a whole stream node (100 entries)
            await self.client.xadd(self.key, {"e": entry.to_json()}, maxlen=self.max_entries,
                                   approximate=False)
        except RedisError as exc:
            raise StoreError(f"ledger store unavailable: {exc}") from exc

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        start = "-"
        while True:
            try:
                page = await self.client.xrange(self.key, min=start, count=1000)
            except RedisError as exc:
                raise StoreError(f"ledger store unavailable: {exc}") from exc
            for _, fields in page:
                yield LedgerEntry.from_json(fields[b"e"])
            if len(page) < 1000:
                return
            start = "(" + page[-1][0].decode()


class FileLedger(Ledger):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    async def record(self, entry: LedgerEntry) -> None:
        async with self.lock:
            await asyncio.to_thread(self._append, entry.to_json())

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield LedgerEntry.from_json(line)


def open_ledger(store: str, *, state_uri: str, key_prefix: str, redis_client: Any | None,
                max_entries: int, path: Path | None) -> Ledger:
    if store == "file":
        if path is None:
            raise ValueError("a file ledger needs a path")
        return FileLedger(path)
    if state_uri.startswith("memory://") or redis_client is None:
        return MemoryLedger(max_entries)
    return RedisLedger(redis_client, f"{key_prefix}:ledger", max_entries)


@dataclass(frozen=True)
class Match:
    piece: int              # 0-based index among the text's pieces
    excerpt: str
    distance: int
    entry: LedgerEntry

    def as_dict(self) -> dict[str, object]:
        return {"piece": self.piece + 1, "excerpt": self.excerpt,
                "account": self.entry.account, "request": self.entry.request_id,
                "distance": self.distance, "time": self.entry.time}


async def match(ledger: Ledger, text: str, max_distance: int = 6) -> list[Match]:
    cut = pieces(text)
    hashes = [simhash64(p) for p in cut]
    excerpts = [" ".join(p.split()[:8]) + " …" for p in cut]
    found = []
    async for entry in ledger.entries():
        for i, h in enumerate(hashes):
            if (distance := entry.distance(h)) <= max_distance:
                found.append(Match(i, excerpts[i], distance, entry))
    return sorted(found, key=lambda m: (m.piece, m.distance))
