"""Output-ledger benchmark: ``python -m bench.ledger [--responses N] [--docs GLOB]``.

(a) storage per 500-word response: fingerprints, SQLite file bytes (index included),
    Redis memory (``MEMORY USAGE`` over its keys), in-process memory (tracemalloc)
(b) record cost per response (µs): fingerprinting, then each store's record
(c) match time against N recorded responses (default 10^5) on the SQLite file store,
    for leaks of 60, 500 and 5,000 words, and whether the right response is found
(d) with ``--docs``: chance matches between unrelated real documents (files matching
    the glob, cut into 500-word responses; half recorded, the other half leaked):
    share of leaks with any match and with a ledger-wide p < 0.01

Synthetic prose (bench/corpus.py, sentences joined to ~18 words as in real answers:
~75 fingerprints per 1,000 words; real prose gives 66-68) stands in for responses in
(a)-(c). Redis is
``redis://127.0.0.1:6379`` under a throw-away key prefix, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import json
import random
import re
import statistics
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

from bench.corpus import prose
from guardproxy.canary.fingerprint import DEFAULT
from guardproxy.canary.ledger import (
    SCHEME,
    LedgerEntry,
    MemoryLedger,
    RedisLedger,
    SqliteLedger,
    ledger_entry,
    match,
)

WORDS = 500


_SENTENCE_END = re.compile(r"[.!?] (\w)")


def response(seed: int) -> str:
    """Synthetic prose with every other sentence joined to the next: ~18 words per
    sentence, as in tests/data (bench/corpus.py's prose has ~11, which would inflate
    the sentence fingerprints by half)."""
    joins = itertools.count()
    return _SENTENCE_END.sub(lambda m: m.group(0) if next(joins) % 2 else
                             ", " + m.group(1).lower(), prose(WORDS, seed=seed))


def responses(n: int, seed: int = 0) -> list[str]:
    return [response(seed + i) for i in range(n)]


def entries(texts: list[str]) -> list[LedgerEntry]:
    return [ledger_entry(t, f"acct-{i % 1000}", f"req-{i}", time.time())
            for i, t in enumerate(texts)]


def per_call_us(fn: object, items: list[object]) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)  # type: ignore[operator]
    return (time.perf_counter() - start) / len(items) * 1e6


async def storage_and_record(sample: list[str], tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    out["fingerprint_us"] = per_call_us(
        lambda t: ledger_entry(t, "a", "r", 0.0), sample)  # type: ignore[arg-type]
    memory = MemoryLedger(len(sample))
    tracemalloc.start()  # everything the ring keeps: entries, their tuples, the index
    before = tracemalloc.get_traced_memory()[0]
    for e in entries(sample):
        await memory.record(e)
    out["memory_bytes"] = (tracemalloc.get_traced_memory()[0] - before) / len(sample)
    tracemalloc.stop()
    prepared = entries(sample)
    out["fingerprints_per_response"] = statistics.mean(len(e.fingerprints) for e in prepared)
    out["fingerprint_bytes"] = out["fingerprints_per_response"] * 12  # 8 hash + 4 position
    memory = MemoryLedger(len(sample))
    start = time.perf_counter()
    for e in prepared:
        await memory.record(e)
    out["memory_record_us"] = (time.perf_counter() - start) / len(prepared) * 1e6

    sqlite = SqliteLedger(tmp / "sample.sqlite", len(prepared), None, SCHEME)
    start = time.perf_counter()
    for e in prepared:
        await sqlite.record(e)
    out["sqlite_record_us"] = (time.perf_counter() - start) / len(prepared) * 1e6
    await sqlite.aclose()

    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        prefix = f"gpbench-{uuid.uuid4().hex[:10]}"
        ledger = RedisLedger(client, prefix, len(prepared))
        try:
            await ledger.record(prepared[0])
            start = time.perf_counter()
            for e in prepared[1:]:
                await ledger.record(e)
            out["redis_record_us"] = (time.perf_counter() - start) / (len(prepared) - 1) * 1e6
            used = 0
            async for key in client.scan_iter(match=f"*{prefix}*", count=1000):
                used += await client.memory_usage(key) or 0
            out["redis_bytes"] = used / len(prepared)
        finally:
            keys = [k async for k in client.scan_iter(match=f"*{prefix}*", count=1000)]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i:i + 1000])
            await client.aclose()
    except OSError as exc:  # no Redis: leave it out
        out["redis_error"] = str(exc)  # type: ignore[assignment]
    return out


def file_bytes(tmp: Path) -> int:
    return sum(p.stat().st_size for p in tmp.glob("ledger.sqlite*"))


def documents(pattern: str) -> list[str]:
    return sorted({p for p in glob.glob(pattern, recursive=True) if Path(p).is_file()})


async def file_store_at_scale(n: int, tmp: Path) -> dict[str, object]:
    path = tmp / "ledger.sqlite"
    ledger = SqliteLedger(path, n, None, SCHEME)
    kept: dict[str, str] = {}  # request id -> text, a few to leak from
    start = time.perf_counter()
    for base in range(0, n, 5000):
        batch = responses(min(5000, n - base), seed=base)
        for i, e in enumerate(entries(batch)):
            request_id = f"req-{base + i}"
            ledger._insert(LedgerEntry(e.account, request_id, e.time, e.words,
                                       e.fingerprints, e.positions))  # as record(), in-thread
            if i % 100 == 0:
                kept[request_id] = batch[i]
    load_s = time.perf_counter() - start
    size = file_bytes(tmp)
    out: dict[str, object] = {"responses": n, "load_s": round(load_s, 1),
                              "file_bytes_per_response": round(size / n)}
    rng = random.Random(3)
    ids = sorted(kept)
    for leak_words in (60, 500, 5000):
        times, found = [], 0
        for _ in range(20):
            if leak_words <= WORDS:  # an excerpt of one response
                want = {rng.choice(ids)}
                words = " ".join(kept[next(iter(want))].split()).split()
                at = rng.randrange(0, len(words) - leak_words + 1)
                leak = " ".join(words[at:at + leak_words])
            else:  # several answers pasted onto one line
                want = set(rng.sample(ids, leak_words // WORDS))
                leak = " ".join(" ".join(kept[r].split()) for r in sorted(want))
            begin = time.perf_counter()
            matches = await match(ledger, leak)
            times.append(time.perf_counter() - begin)
            found += want <= {m.entry.request_id for m in matches}
        out[f"match_{leak_words}w_ms_median"] = round(statistics.median(times) * 1e3, 2)
        out[f"match_{leak_words}w_ms_max"] = round(max(times) * 1e3, 2)
        out[f"match_{leak_words}w_found"] = f"{found}/20"
    await ledger.aclose()
    return out


async def chance_matches(pattern: str, tmp: Path) -> dict[str, object]:
    files = documents(pattern)
    random.Random(0).shuffle(files)
    recorded, leaked = files[: len(files) // 2], files[len(files) // 2:]

    def chunks(paths: list[str]) -> list[str]:
        out = []
        for p in paths:
            words = Path(p).read_text(encoding="utf-8", errors="replace").split(" ")
            out += [" ".join(words[i:i + WORDS]) for i in range(0, min(len(words), 4000), WORDS)
                    if len(words[i:i + WORDS]) >= 100]
        return out

    ledger = MemoryLedger(10**7)
    for i, text in enumerate(chunks(recorded)):
        await ledger.record(ledger_entry(text, "a", f"r{i}", time.time()))
    leaks = chunks(leaked)
    anything = significant = 0
    for text in leaks:
        found = await match(ledger, text, limit=1)
        anything += bool(found)
        significant += bool(found and found[0].log10_p_ledger < -2)
    return {"files": len(files), "recorded_responses": len(ledger.ring),
            "leaks": len(leaks), "leaks_with_any_match": anything,
            "leaks_with_p_ledger_below_0.01": significant}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--docs", help="glob of real documents for the chance-match test")
    args = parser.parse_args()
    report: dict[str, object] = {"scheme": SCHEME, "guarantee_words": DEFAULT.guarantee}
    with tempfile.TemporaryDirectory() as tmp:
        report["per_response_500_words"] = await storage_and_record(
            responses(args.sample, seed=10**7), Path(tmp))
        report["file_store"] = await file_store_at_scale(args.responses, Path(tmp))
        if args.docs:
            report["chance"] = await chance_matches(args.docs, Path(tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
