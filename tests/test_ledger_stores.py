"""The ledger stores (memory, Redis, SQLite file): bounded retention, an index instead of
a scan, one round trip per record on Redis, and the CLI / admin paths that read them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from guardproxy.app import create_app
from guardproxy.canary.ledger import (
    SCHEME,
    Ledger,
    LedgerEntry,
    MemoryLedger,
    RedisLedger,
    SqliteLedger,
    ledger_entry,
    match,
)
from guardproxy.cli import main
from guardproxy.errors import PolicyError, StoreError
from guardproxy.guards.canary import CanaryGuard
from guardproxy.policy.load import load_policy
from tests.conftest import write_policy

ANSWERS = (Path(__file__).parent / "data" / "ledger_answers.md").read_text().split("\n=====\n")
SECRET = "canary-secret-for-tests-0123456789"
T0 = 1_700_000_000.0


def entry(i: int, when: float | None = None) -> LedgerEntry:
    return ledger_entry(ANSWERS[i % 6], f"acct-{i}", f"req-{i}", T0 + i if when is None else when)


async def kept(ledger: Ledger) -> list[str]:
    return [e.request_id async for e in ledger.entries()]


@pytest.fixture
async def redis_ledger(redis_prefix: tuple[str, str]) -> AsyncIterator[tuple[Any, str]]:
    url, prefix = redis_prefix
    client = aioredis.Redis.from_url(url)
    yield client, prefix
    await client.aclose()


def sqlite_ledger(tmp_path: Path, max_entries: int, max_age: float | None = None) -> SqliteLedger:
    return SqliteLedger(tmp_path / "ledger.sqlite", max_entries, max_age, SCHEME)


# -- retention ------------------------------------------------------------------------

async def test_memory_keeps_the_newest_entries_and_only_their_fingerprints() -> None:
    ledger = MemoryLedger(4)
    for i in range(11):
        await ledger.record(entry(i))
    assert await kept(ledger) == ["req-7", "req-8", "req-9", "req-10"]
    live = [e async for e in ledger.entries()]
    assert set(ledger.index) == {fp for e in live for fp in e.fingerprints}
    held = [s for v in ledger.index.values() for s in ([v] if isinstance(v, int) else v)]
    assert set(held) == set(ledger.ring) and len(held) == sum(
        len(e.fingerprints) for e in live)


async def test_memory_evicts_by_age() -> None:
    ledger = MemoryLedger(100, max_age=3600)
    await ledger.record(entry(0, T0))
    await ledger.record(entry(1, T0 + 1800))
    await ledger.record(entry(2, T0 + 4000))
    assert await kept(ledger) == ["req-1", "req-2"]


async def test_redis_bounds_entries_and_postings(redis_ledger: tuple[Any, str]) -> None:
    client, prefix = redis_ledger
    ledger = RedisLedger(client, prefix, 5)
    for i in range(13):
        await ledger.record(entry(i))
    assert await kept(ledger) == [f"req-{i}" for i in range(8, 13)]
    base = f"{prefix}:ledger:{{{prefix}}}"
    assert await client.hlen(f"{base}:e") == 5
    postings: list[bytes] = []
    async for key in client.scan_iter(match=f"{base}:f:*"):
        for held in (await client.hgetall(key)).values():
            postings += held.split()
    assert sorted(set(postings)) == sorted(str(s).encode() for s in range(9, 14))
    assert len(postings) == sum(len(entry(i).fingerprints) for i in range(8, 13))


async def test_redis_evicts_by_age(redis_ledger: tuple[Any, str]) -> None:
    client, prefix = redis_ledger
    ledger = RedisLedger(client, prefix, 100, max_age=3600)
    for when in (T0, T0 + 1800, T0 + 4000):
        await ledger.record(entry(int(when - T0) % 6, when))
    assert [e.time async for e in ledger.entries()] == [T0 + 1800, T0 + 4000]


async def test_redis_records_in_one_round_trip_and_matches_by_index(
        redis_ledger: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    client, prefix = redis_ledger
    ledger = RedisLedger(client, prefix, 100)
    await ledger.record(entry(0))  # the first call may load the script
    sent: list[str] = []
    original = client.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return await original(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", counting)
    for i in range(1, 6):
        await ledger.record(entry(i))
    assert sent == ["EVALSHA"] * 5
    leak = " ".join(" ".join(ANSWERS[i].split()) for i in (2, 4))
    found = await match(ledger, leak, now=T0 + 10)
    assert {m.entry.request_id for m in found} == {"req-2", "req-4"}
    assert "HSCAN" not in sent and "HGETALL" not in sent, "matching never scans"


async def test_sqlite_bounds_entries_and_index_rows(tmp_path: Path) -> None:
    ledger = sqlite_ledger(tmp_path, 5)
    for i in range(13):
        await ledger.record(entry(i))
    assert await kept(ledger) == [f"req-{i}" for i in range(8, 13)]
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    rows = db.execute("SELECT count(*), count(DISTINCT entry) FROM fingerprints").fetchone()
    assert rows == (sum(len(entry(i).fingerprints) for i in range(8, 13)), 5)
    assert (await ledger.lookup([], 10)).total == 5
    found = await match(ledger, ANSWERS[3], now=T0 + 20)
    assert [m.entry.request_id for m in found] == ["req-9"]
    await ledger.aclose()


async def test_sqlite_evicts_by_age_and_shares_one_file(tmp_path: Path) -> None:
    first, second = sqlite_ledger(tmp_path, 100, 3600), sqlite_ledger(tmp_path, 100, 3600)
    await first.record(entry(0, T0))
    await second.record(entry(1, T0 + 1800))  # another process appends to the same file
    await first.record(entry(2, T0 + 4000))
    assert await kept(second) == ["req-1", "req-2"]
    assert (await second.lookup([], 1)).total == 2
    for ledger in (first, second):
        await ledger.aclose()


async def test_sqlite_writes_off_the_event_loop(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = sqlite_ledger(tmp_path, 10)
    threads: list[int] = []
    insert = ledger._insert

    def spy(e: LedgerEntry) -> None:
        threads.append(threading.get_ident())
        insert(e)

    monkeypatch.setattr(ledger, "_insert", spy)
    await ledger.record(entry(0))
    assert threads and threads[0] != threading.get_ident()
    await ledger.aclose()


async def test_sqlite_refuses_an_old_jsonl_ledger_and_another_scheme(tmp_path: Path) -> None:
    old = tmp_path / "ledger.sqlite"
    old.write_text('{"simhash": "00ff", "account": "a"}\n' * 50)
    with pytest.raises(StoreError, match="not a usable SQLite ledger"):
        await sqlite_ledger(tmp_path, 10).record(entry(0))
    other = SqliteLedger(tmp_path / "other.sqlite", 10, None, "another-scheme")
    await other.record(entry(0))
    await other.aclose()
    with pytest.raises(StoreError, match="another scheme"):
        await SqliteLedger(tmp_path / "other.sqlite", 10, None, SCHEME).record(entry(1))


async def test_reading_a_missing_file_ledger_creates_nothing(tmp_path: Path) -> None:
    ledger = sqlite_ledger(tmp_path, 10)
    assert await match(ledger, ANSWERS[0]) == [] and await kept(ledger) == []
    assert not (tmp_path / "ledger.sqlite").exists()


# -- policy, CLI and admin ------------------------------------------------------------

def ledger_rule(ledger: str) -> str:
    return f"rules:\n  - name: marks\n    canary: {{secret: {SECRET}, ledger: {ledger}}}\n"


def test_policy_shape_defaults_and_max_age(tmp_path: Path) -> None:
    def settings(ledger: str) -> Any:
        return load_policy(write_policy(tmp_path, ledger_rule(ledger)), {}).rules[0] \
            .settings.ledger

    assert (settings("true").max_entries, settings("true").max_age) == (100_000, None)
    file = settings("{store: file, path: l.sqlite, max_age: 90d}")
    assert (file.store, file.max_entries, file.max_age) == ("file", 1_000_000, 90 * 86400.0)
    assert settings("{store: state, max_entries: 7, max_age: 36h}").max_age == 36 * 3600.0
    with pytest.raises(PolicyError, match="max_age"):
        settings("{store: file, path: l.sqlite, max_age: forever}")


def test_cli_matches_a_file_ledger(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, ledger_rule("{store: file, path: ledger.sqlite}"))

    async def record() -> None:
        ledger = sqlite_ledger(tmp_path, 100)
        for i in range(6):
            await ledger.record(entry(i))
        await ledger.aclose()

    asyncio.run(record())
    leak = tmp_path / "leak.txt"
    leak.write_text(" ".join(" ".join(ANSWERS[i].split()) for i in (0, 5)))
    unrelated = tmp_path / "other.txt"
    unrelated.write_text(ANSWERS[6])
    result = CliRunner().invoke(main, ["ledger", "match", str(leak), str(unrelated),
                                       "--policy", str(policy), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["file"], r["account"], r["request_id"]) for r in rows} == {
        (str(leak), "acct-0", "req-0"), (str(leak), "acct-5", "req-5")}
    text = CliRunner().invoke(main, ["ledger", "match", str(leak), "--policy", str(policy),
                                     "--max-distance", "6"])
    assert text.exit_code == 0 and "account=acct-5 request=req-5" in text.output
    assert "deprecated" in text.output
    nothing = CliRunner().invoke(main, ["ledger", "match", str(unrelated), "--policy",
                                        str(policy)])
    assert nothing.exit_code == 0 and "no match" in nothing.output


def test_cli_names_an_unusable_ledger_file(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, ledger_rule("{store: file, path: ledger.jsonl}"))
    (tmp_path / "ledger.jsonl").write_text('{"simhash": "00"}\n')
    leak = tmp_path / "leak.txt"
    leak.write_text(ANSWERS[0])
    result = CliRunner().invoke(main, ["ledger", "match", str(leak), "--policy", str(policy)])
    assert result.exit_code == 1 and "not a usable SQLite ledger" in result.output
    assert "Traceback" not in result.output


async def test_admin_match_reads_the_in_process_ledger(tmp_path: Path) -> None:
    app = create_app(write_policy(tmp_path, "admin: {token: adm1n}\n" + ledger_rule("true")))
    (guard,) = [g for g in app.guarded.pipeline.guards if isinstance(g, CanaryGuard)]
    assert isinstance(guard.ledger, MemoryLedger)
    for i in range(6):
        await guard.ledger.record(entry(i, when=None))
    leak = "\n".join(" ".join(ANSWERS[i].split()) for i in (1, 3))
    admin = {"authorization": "Bearer adm1n"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://proxy") as client:
        both = await client.post("/admin/ledger/match", content=leak, headers=admin)
        old = await client.post("/admin/ledger/match?max_distance=6&limit=1", content=leak,
                                headers=admin)
        bad = await client.post("/admin/ledger/match?limit=0", content=leak, headers=admin)
    assert both.status_code == 200
    rows = both.json()["matches"]
    assert {(r["account"], r["request_id"]) for r in rows} == {("acct-1", "req-1"),
                                                                ("acct-3", "req-3")}
    assert all(r["log10_p"] < -1 and r["shared"] >= 10 and r["excerpt"] for r in rows)
    assert old.status_code == 200 and len(old.json()["matches"]) == 1
    assert bad.status_code == 400 and "limit" in bad.json()["error"]
