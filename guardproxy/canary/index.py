"""The known accounts' codewords, built once and scanned exhaustively.

An ``AccountIndex`` holds every known account's 256-bit codeword (``CanaryKeys.code``)
as a Python int, and scans all of them for the one nearest the positions a text covers:
``((code ^ observed) & covered).bit_count()`` per account, about 0.1 s per 10^6 accounts.
No account is left out by a lookup threshold, so attribution works at any coverage.

It is built in memory from account ids, or read from an index file that
``guardproxy canary index build`` writes once; the file is memory-mapped, ids are decoded
only for the accounts reported, so memory stays bounded (~80 MB per 10^6 accounts, the
codewords as ints). Layout, little-endian::

    header   64 bytes: magic b"GPCANIX1", key fingerprint (16), accounts digest (16),
             count N (u64), id bytes B (u64), zero padding
    codes    N x 32 bytes, each codeword as a 256-bit little-endian integer
    offsets  (N + 1) x u64, where each id starts in the id blob
    ids      B bytes of UTF-8

The fingerprint is an HMAC of a fixed label under the key that derives codewords, never
the secret itself: an index built under another secret is refused. The accounts digest
names the policy's own account list at build time, to warn that an index is stale.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress
from pathlib import Path
from typing import overload

from guardproxy.canary.keys import CanaryKeys

MAGIC = b"GPCANIX1"
_HEADER = struct.Struct("<8s16s16sQQ")
HEADER_BYTES = 64
CODE_BYTES = 32
MAX_PICKED = 1000      # accounts returned by one scan at most (ties past k included)


def population_of(known: int, given: int | None) -> int:
    """The number of accounts the Bonferroni correction covers: ``given`` (accounts that
    could have received the text, e.g. when not all are in the index), else ``known``.
    Raises ``ValueError`` when ``given`` is below ``known``: every scored account is one."""
    if given is None:
        return known
    if given < known:
        raise ValueError(f"population must be at least the number of known accounts "
                         f"({known}), got {given}")
    return given


class IndexFileError(ValueError):
    """An index file that cannot be used: not an index, damaged, or another secret's."""


def fingerprint(keys: CanaryKeys) -> bytes:
    """16 bytes naming the key that derives codewords; reveals nothing of the secret."""
    return hmac.digest(keys.tag_key, b"guardproxy/canary/index-fingerprint", "sha256")[:16]


def accounts_digest(accounts: Iterable[str]) -> bytes:
    """16 bytes naming a list of account ids, in the order given."""
    h = hashlib.blake2b(digest_size=16)
    for account in accounts:
        h.update(account.encode() + b"\n")
    return h.digest()


class _FileIds(Sequence[str]):
    """Account ids read from the mapped file one at a time."""

    def __init__(self, data: mmap.mmap, offsets_at: int, ids_at: int, count: int) -> None:
        self._data, self._offsets_at, self._ids_at, self._count = data, offsets_at, ids_at, count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if not -self._count <= i < self._count:
            raise IndexError(i)
        i %= self._count
        start, end = struct.unpack_from("<QQ", self._data, self._offsets_at + 8 * i)
        return self._data[self._ids_at + start:self._ids_at + end].decode()


class AccountIndex:
    """Known accounts and their codewords; build once, detect many times.

    ``AccountIndex(keys, ids)`` computes the codewords (one HMAC per account, ~2 s per
    10^6); ``AccountIndex.open(path, keys)`` reads an index file instead.
    """

    def __init__(self, keys: CanaryKeys, accounts: Iterable[str]) -> None:
        ids = list(dict.fromkeys(accounts))   # the same account twice is one account
        self.ids: Sequence[str] = ids
        self.count = len(ids)
        self.fingerprint = fingerprint(keys)
        self.digest = b""                       # only files record the policy's accounts
        self._codes: list[int] | None = [keys.code(a) for a in ids]
        self._map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path, keys: CanaryKeys) -> AccountIndex:
        """Map an index file. Raises ``IndexFileError`` (one line, naming ``path``) for a
        file that is not an index, is truncated, or was built with another secret."""
        try:
            with path.open("rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:   # ValueError: an empty file cannot be mapped
            raise IndexFileError(f"{path}: cannot read the index: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            if len(data) < HEADER_BYTES or data[:8] != MAGIC:
                raise IndexFileError(f"{path}: not a canary account index")
            _, mark, digest, count, id_bytes = _HEADER.unpack_from(data, 0)
            offsets_at = HEADER_BYTES + CODE_BYTES * count
            ids_at = offsets_at + 8 * (count + 1)
            if len(data) != ids_at + id_bytes:
                raise IndexFileError(f"{path}: truncated or damaged index "
                                     f"({len(data)} bytes, header says {ids_at + id_bytes})")
            if not hmac.compare_digest(mark, fingerprint(keys)):
                raise IndexFileError(f"{path}: built with another canary secret; rebuild it "
                                     "with 'guardproxy canary index build'")
        except IndexFileError:
            data.close()
            raise
        index = cls.__new__(cls)
        index.ids = _FileIds(data, offsets_at, ids_at, count)
        index.count, index.fingerprint, index.digest = count, mark, digest
        index._codes, index._map = None, data
        return index

    def close(self) -> None:
        self._codes = None
        if self._map is not None:
            self.ids = []
            self._map.close()
            self._map = None

    def __len__(self) -> int:
        return self.count

    def codes(self) -> list[int]:
        """Every codeword as an int, in id order (read from the file on first use)."""
        if self._codes is None:
            assert self._map is not None, "a closed index"
            end = HEADER_BYTES + CODE_BYTES * self.count
            with memoryview(self._map) as view:
                self._codes = [int.from_bytes(view[i:i + CODE_BYTES], "little")
                               for i in range(HEADER_BYTES, end, CODE_BYTES)]
        return self._codes

    def nearest(self, observed: int, covered: int, k: int,
                within: int = -1) -> list[tuple[int, int]]:
        """(account number, disagreements) of the accounts nearest ``observed`` on the
        positions in ``covered``: the ``k`` nearest, every account tied with the k-th,
        and every account within ``within`` disagreements; at most ``MAX_PICKED``, the
        nearest first. Exhaustive: every known account is scored."""
        dist = [((c ^ observed) & covered).bit_count() for c in self.codes()]
        if not dist:
            return []
        histogram = Counter(dist)            # at most 257 distinct values
        cut, seen = within, 0
        for d in sorted(histogram):
            seen += histogram[d]
            if seen >= k:
                cut = max(cut, d)
                break
        else:
            cut = max(histogram)
        picked = list(compress(range(len(dist)), map(cut.__ge__, dist)))
        picked.sort(key=dist.__getitem__)    # stable: equal distances keep id order
        return [(i, dist[i]) for i in picked[:MAX_PICKED]]


def read_ids(path: Path) -> Iterator[str]:
    """Account ids from a text file, one per line; blank lines and surrounding
    whitespace are ignored."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if account := line.strip():
                yield account


def write_index(path: Path, keys: CanaryKeys, accounts: Iterable[str],
                policy_accounts: Sequence[str] = ()) -> int:
    """Write an index file of ``accounts`` (duplicates dropped, first kept) atomically;
    ``policy_accounts`` is recorded by digest to detect a stale index. Returns the count."""
    ids = list(dict.fromkeys(accounts))
    encoded = [a.encode() for a in ids]
    id_bytes = sum(map(len, encoded))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_HEADER.pack(MAGIC, fingerprint(keys), accounts_digest(policy_accounts),
                                   len(ids), id_bytes).ljust(HEADER_BYTES, b"\0"))
            for start in range(0, len(ids), 65536):  # bounded buffers: 2 MB of codes each
                out.write(b"".join(keys.code(a).to_bytes(CODE_BYTES, "little")
                                   for a in ids[start:start + 65536]))
            offsets, at = [0], 0
            for data in encoded:
                at += len(data)
                offsets.append(at)
            out.write(struct.pack(f"<{len(offsets)}Q", *offsets))
            out.write(b"".join(encoded))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(ids)
