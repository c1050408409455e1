"""The file ledger: one SQLite database, for ledgers larger than memory and offline search.

Why SQLite: it is in the standard library, several proxy processes can append to one
file (WAL journal: readers never block the writer), and a B-tree index on the
fingerprint answers a lookup in O(log n) per fingerprint from disk, with memory bounded
by SQLite's page cache, whatever the ledger's size. The file is a plain database any
analytical engine reads (DuckDB's sqlite extension attaches it as is) — but a columnar
engine would scan for point lookups, and is not a dependency here.

Schema::

    entries(id INTEGER PRIMARY KEY, account, request_id, time REAL, words INTEGER,
            fps BLOB, pos BLOB)          -- fingerprints as little-endian uint64,
                                         -- their word positions as uint32
    fingerprints(fp INTEGER, entry INTEGER, PRIMARY KEY (fp, entry)) WITHOUT ROWID
    meta(key TEXT PRIMARY KEY, value)    -- the fingerprint scheme

Ids grow by one per response and eviction removes the oldest, so the live ids are
contiguous: the number of responses is ``max(id) - min(id) + 1``. Each record is one
transaction that also evicts, oldest first (at most 64 per record), entries beyond
``max_entries`` or older than ``max_age``, with their index rows. All I/O runs in a
worker thread, one connection for writing and one for reading.

Costs (500-word responses, ~38 fingerprints): ~1.3 KB of file per response, index
included; a record takes 0.5 ms on a small ledger and 1.5-2 ms at 10^5 responses,
mostly writing the ~70 index pages it touches (inserts and evictions at random
fingerprints) to the WAL and checkpointing them; a lookup is one B-tree descent per
fingerprint (~2 ms for a 500-word leak at 10^5 responses).
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from guardproxy.canary.ledger_stores import Ledger, LedgerEntry, Lookup
from guardproxy.errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, account TEXT NOT NULL, request_id TEXT NOT NULL,
    time REAL NOT NULL, words INTEGER NOT NULL, fps BLOB NOT NULL, pos BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (
    fp INTEGER NOT NULL, entry INTEGER NOT NULL, PRIMARY KEY (fp, entry)) WITHOUT ROWID;
"""
EVICT_PER_RECORD = 64
CHUNK = 500  # fingerprints per IN (…) query


def _signed(fp: int) -> int:
    """SQLite integers are signed 64-bit."""
    return fp - (1 << 64) if fp >= 1 << 63 else fp


def _unsigned(fp: int) -> int:
    return fp + (1 << 64) if fp < 0 else fp


def _fps(blob: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(blob) // 8}Q", blob)


def _entry(row: tuple[int, str, str, float, int, bytes, bytes]) -> LedgerEntry:
    _, account, request_id, time, words, fps, pos = row
    return LedgerEntry(account, request_id, time, words, _fps(fps),
                       struct.unpack(f"<{len(pos) // 4}I", pos))


class SqliteLedger(Ledger):
    def __init__(self, path: Path, max_entries: int, max_age: float | None = None,
                 scheme: str = "") -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_age = max_age
        self.scheme = scheme
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    # -- connections -------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable up to the last checkpoint
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('scheme', ?)", (self.scheme,))
            (found,) = conn.execute("SELECT value FROM meta WHERE key = 'scheme'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable SQLite ledger ({exc}); a JSON-lines "
                             "ledger of an earlier version cannot be searched: move it "
                             "aside") from exc
        if found != self.scheme:
            conn.close()
            raise StoreError(f"{self.path}: fingerprints of another scheme ({found!r}, this "
                             f"version writes {self.scheme!r}): use a new path")
        return conn

    def _write_conn(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = self._open()
        return self._writer

    def _read_conn(self) -> sqlite3.Connection | None:
        if self._reader is None:
            if not self.path.exists():
                return None  # nothing recorded yet: do not create the file to read it
            self._reader = self._open()
        return self._reader

    # -- writing -----------------------------------------------------------------------
    def _insert(self, entry: LedgerEntry) -> None:
        conn = self._write_conn()
        n = len(entry.fingerprints)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "INSERT INTO entries (account, request_id, time, words, fps, pos) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.account, entry.request_id, entry.time, entry.words,
                     struct.pack(f"<{n}Q", *entry.fingerprints),
                     struct.pack(f"<{n}I", *entry.positions)))
                new_id = cur.lastrowid
                conn.executemany("INSERT OR IGNORE INTO fingerprints VALUES (?, ?)",
                                 [(_signed(fp), new_id) for fp in entry.fingerprints])
                assert new_id is not None
                self._evict(conn, new_id, entry.time)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"ledger file {self.path}: {exc}") from exc

    def _evict(self, conn: sqlite3.Connection, newest: int, now: float) -> None:
        oldest_kept = newest - self.max_entries + 1
        cutoff = None if self.max_age is None else now - self.max_age
        gone: list[tuple[int, bytes]] = []
        for row_id, time, fps in conn.execute(
                "SELECT id, time, fps FROM entries WHERE id < ? ORDER BY id LIMIT ?",
                (newest, EVICT_PER_RECORD)):
            if row_id >= oldest_kept and (cutoff is None or time >= cutoff):
                break
            gone.append((row_id, fps))
        if not gone:
            return
        conn.executemany("DELETE FROM fingerprints WHERE fp = ? AND entry = ?",
                         [(_signed(fp), row_id) for row_id, fps in gone for fp in _fps(fps)])
        conn.execute("DELETE FROM entries WHERE id <= ?", (gone[-1][0],))

    async def record(self, entry: LedgerEntry) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self._insert, entry)

    # -- reading -----------------------------------------------------------------------
    def _lookup(self, fingerprints: Sequence[int], common: int) -> Lookup:
        conn = self._read_conn()
        if conn is None:
            return Lookup(total=0)
        try:
            # two subqueries: SQLite reads min() and max() off the B-tree only one at a time
            low, high = conn.execute("SELECT (SELECT min(id) FROM entries), "
                                     "(SELECT max(id) FROM entries)").fetchone()
            out = Lookup(total=0 if low is None else high - low + 1)
            wanted = [_signed(fp) for fp in fingerprints]
            for i in range(0, len(wanted), CHUNK):
                chunk = wanted[i:i + CHUNK]
                marks = ",".join("?" * len(chunk))
                counts = conn.execute(f"SELECT fp, count(*) FROM fingerprints "
                                      f"WHERE fp IN ({marks}) GROUP BY fp", chunk).fetchall()
                listed = [fp for fp, n in counts if n <= common]
                for fp, n in counts:
                    out.counts[_unsigned(fp)] = n
                if not listed:
                    continue
                held: dict[int, list[str]] = {}
                marks = ",".join("?" * len(listed))
                for fp, entry in conn.execute(f"SELECT fp, entry FROM fingerprints "
                                              f"WHERE fp IN ({marks})", listed):
                    held.setdefault(_unsigned(fp), []).append(str(entry))
                out.postings.update((fp, tuple(keys)) for fp, keys in held.items())
            return out
        except sqlite3.Error as exc:
            raise StoreError(f"ledger file {self.path}: {exc}") from exc

    def _fetch(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        conn = self._read_conn()
        if conn is None or not keys:
            return {}
        try:
            out: dict[str, LedgerEntry] = {}
            for i in range(0, len(keys), CHUNK):
                ids = [int(k) for k in keys[i:i + CHUNK]]
                marks = ",".join("?" * len(ids))
                for row in conn.execute(f"SELECT * FROM entries WHERE id IN ({marks})", ids):
                    out[str(row[0])] = _entry(row)
            return out
        except sqlite3.Error as exc:
            raise StoreError(f"ledger file {self.path}: {exc}") from exc

    async def lookup(self, fingerprints: Sequence[int], common: int) -> Lookup:
        async with self._read_lock:
            return await asyncio.to_thread(self._lookup, fingerprints, common)

    async def fetch(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        async with self._read_lock:
            return await asyncio.to_thread(self._fetch, keys)

    async def entries(self) -> AsyncIterator[LedgerEntry]:
        after = 0
        while True:
            async with self._read_lock:
                rows = await asyncio.to_thread(self._page, after)
            for row in rows:
                yield _entry(row)
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    def _page(self, after: int) -> list[tuple[int, str, str, float, int, bytes, bytes]]:
        conn = self._read_conn()
        if conn is None:
            return []
        try:
            return conn.execute("SELECT * FROM entries WHERE id > ? ORDER BY id LIMIT 1000",
                                (after,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"ledger file {self.path}: {exc}") from exc

    async def aclose(self) -> None:
        async with self._write_lock, self._read_lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    await asyncio.to_thread(conn.close)
            self._writer = self._reader = None
