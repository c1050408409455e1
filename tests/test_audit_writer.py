"""The audit writer on its own: rotation, the hash chain and ``guardproxy audit verify``
(tampered, deleted and torn lines, missing files, restarts), a full queue (dropped,
counted, logged once, never blocking), stdout, and what a reload does to the writer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardproxy.audit.line import GENESIS
from guardproxy.audit.settings import AuditSettings
from guardproxy.audit.trail import audit_observer, audit_trails
from guardproxy.audit.verify import rotation_order, verify_chain
from guardproxy.audit.writer import AuditWriter, Counters
from guardproxy.cli import main
from guardproxy.observe import Decision, RequestRecord
from guardproxy.policy.load import load_policy
from guardproxy.state import open_state
from tests.conftest import write_policy
from tests.test_audit import no_secret_in_any_line  # noqa: F401 - autouse: scans every line

T0 = 1_764_460_800.0


def record(i: int, account: str | None = "alice") -> RequestRecord:
    return RequestRecord(time=T0 + i, request_id=f"r{i}", method="POST",
                         path="/v1/chat/completions", route="chat", dialect="openai",
                         status=200, ending="completed", account=account, client_ip="10.1.2.3",
                         decisions=(Decision("q", "enforce", True),))


def write(settings: AuditSettings, first: int, count: int,
          counters: Counters | None = None) -> Counters:
    counters = counters or Counters()
    writer = AuditWriter(settings, counters)
    for i in range(first, first + count):
        writer.submit(record(i))
    asyncio.run(writer.aclose())
    return counters


def ids(*files: Path) -> list[str]:
    return [json.loads(t)["request_id"] for f in files for t in f.read_text().splitlines()]


def verify(*files: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", "verify", *map(str, files)])
    return result.exit_code, result.stdout


def test_rotation_keeps_backups_and_the_chain_runs_across_files(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(audit), max_bytes=1500, backups=2, chain=True)
    counters = write(settings, 0, 40)
    assert (counters.written, counters.dropped) == (40, 0)
    files = [tmp_path / f"audit.jsonl.{n}" for n in (2, 1)] + [audit]
    assert sorted(p.name for p in tmp_path.glob("audit*")) == sorted(p.name for p in files)
    assert all(0 < f.stat().st_size <= 1500 for f in files)
    kept = ids(*files)
    assert kept == [f"r{i}" for i in range(40 - len(kept), 40)], "the newest, in order"
    assert len(kept) < 40, "older files were deleted: backups: 2"

    report = verify_chain(map(str, files))
    assert report.breaks == [] and report.lines == len(kept)
    assert report.anchor != GENESIS, "the trail's first lines were rotated away"
    code, out = verify(audit, files[1], files[0])   # any order: rotations sorted
    assert code == 0 and out.startswith(f"OK: {len(kept)} lines in 3 files"), out
    assert report.last is not None and report.last in out


def test_a_restart_continues_the_chain_of_the_file(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(audit), chain=True)
    write(settings, 0, 3)
    write(settings, 3, 3)   # a new process: the chain picks up the file's last line
    report = verify_chain([str(audit)])
    assert (report.breaks, report.lines, report.anchor) == ([], 6, GENESIS)
    assert ids(audit) == [f"r{i}" for i in range(6)]


def test_a_torn_last_line_is_closed_and_reported_once(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(audit), chain=True)
    write(settings, 0, 3)
    audit.write_bytes(audit.read_bytes()[:-25])   # a crash mid-write
    write(settings, 3, 2)
    report = verify_chain([str(audit)])
    assert [(b.line, "JSON" in b.reason) for b in report.breaks] == [(3, True)]
    assert report.lines == 5


def chained(tmp_path: Path, count: int = 30) -> list[Path]:
    audit = tmp_path / "audit.jsonl"
    write(AuditSettings(path=str(audit), max_bytes=2000, backups=9, chain=True), 0, count)
    files = [Path(p) for p in rotation_order([str(p) for p in tmp_path.glob("audit*")])]
    assert len(files) >= 3 and verify(*files)[0] == 0
    return files


def test_verify_finds_a_changed_line(tmp_path: Path) -> None:
    files = chained(tmp_path)
    middle = files[1].read_text().splitlines(keepends=True)
    middle[1] = middle[1].replace('"status":200', '"status":201')
    files[1].write_text("".join(middle))
    code, out = verify(*files)
    assert code == 1
    assert out.splitlines() == [f"{files[1]}:3: 'prev' is not the hash of the line before "
                                f"({files[1]}:2): that line was changed, or lines were "
                                "removed or inserted here"]


def test_verify_finds_a_deleted_line_and_a_missing_file(tmp_path: Path) -> None:
    files = chained(tmp_path)
    first = files[0].read_text().splitlines(keepends=True)
    files[0].write_text("".join(first[:1] + first[2:]))
    code, out = verify(*files)
    assert code == 1 and [ln.split(": ")[0] for ln in out.splitlines()] == [f"{files[0]}:2"]
    (tmp_path / "again").mkdir()
    intact = chained(tmp_path / "again")
    code, out = verify(intact[0], *intact[2:])   # the middle file is gone
    assert code == 1 and out.startswith(f"{intact[2]}:1: 'prev' is not the hash")


def test_verify_in_the_order_given_and_without_a_chain(tmp_path: Path) -> None:
    files = chained(tmp_path)
    result = CliRunner().invoke(main, ["audit", "verify", "--as-given",
                                       *map(str, reversed(files))])
    assert result.exit_code == 1
    plain = tmp_path / "plain.jsonl"
    write(AuditSettings(path=str(plain)), 0, 2)
    code, out = verify(plain)
    assert code == 1 and out.startswith(f"{plain}:1: no 'prev' hash")


def test_rotation_order() -> None:
    assert rotation_order(["a.jsonl", "a.jsonl.10", "b.log.1", "a.jsonl.2", "./a.jsonl",
                           "b.log"]) == ["a.jsonl.10", "a.jsonl.2", "a.jsonl", "b.log.1",
                                         "b.log"]


def test_a_full_queue_drops_counts_and_warns_once_without_blocking(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer is stuck (a FIFO nobody reads yet): submitting never waits; lines past
    ``queue`` are dropped and counted; one warning for the burst, one when it ends."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    counters = Counters()
    writer = AuditWriter(AuditSettings(path=str(fifo), max_bytes=0, queue=5), counters)
    caplog.set_level(logging.WARNING, logger="guardproxy.audit")
    def submit_all() -> None:
        for i in range(20):
            writer.submit(record(i))

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    submitter.join(timeout=30)
    assert not submitter.is_alive(), "submit blocked on a stuck writer"
    assert (counters.written, counters.dropped) == (0, 15)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "dropping lines" in warnings[0]

    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()   # unblocks the writer
    asyncio.run(writer.aclose())
    reader.join(timeout=30)
    assert [json.loads(t)["request_id"] for t in got[0].splitlines()] == \
        [f"r{i}" for i in range(5)]
    assert counters.written == 5
    assert [r.getMessage() for r in caplog.records][1:] == \
        [f"audit trail {fifo}: 15 lines dropped in that burst"]
    writer.submit(record(99))   # closed: counted, never silent
    assert counters.dropped == 16


def test_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write(AuditSettings(path="-", chain=True), 0, 2)
    out = capfd.readouterr().out.splitlines()
    assert [json.loads(t)["request_id"] for t in out] == ["r0", "r1"]
    assert json.loads(out[0])["prev"] == GENESIS


def test_a_second_writer_of_one_file_is_told(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Two workers on one path would interleave lines and break rotation and the chain."""
    audit = tmp_path / "audit.jsonl"
    holder = AuditWriter(AuditSettings(path=str(audit)), Counters())
    holder.submit(record(0))
    deadline = time.monotonic() + 10   # a wait for the holder's first line, not a timing
    while not (audit.exists() and audit.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    caplog.set_level(logging.ERROR, logger="guardproxy.audit")
    write(AuditSettings(path=str(audit)), 1, 1)
    asyncio.run(holder.aclose())
    assert "another process writes this file" in caplog.text and "{pid}" in caplog.text
    assert sorted(ids(audit)) == ["r0", "r1"]


def test_pid_in_the_path(tmp_path: Path) -> None:
    write(AuditSettings(path=str(tmp_path / "audit-{pid}.jsonl")), 0, 1)
    assert ids(tmp_path / f"audit-{os.getpid()}.jsonl") == ["r0"]


async def test_reloads_keep_the_writer_or_hand_over_to_the_next(tmp_path: Path) -> None:
    first, second = tmp_path / "audit.jsonl", tmp_path / "next.jsonl"
    policy = load_policy(write_policy(tmp_path, f"audit: {{path: {first}}}\nrules: []\n"))
    assert policy.audit is not None
    state = open_state("memory://")
    old = audit_observer(policy, state)
    assert old is not None
    same = audit_observer(replace(policy, audit=replace(policy.audit, include=("prompt",))),
                          state)
    assert same is not None and same.writer is old.writer, "include alone keeps the writer"
    old.completed(record(0))
    new = audit_observer(replace(policy, audit=replace(policy.audit, path=str(second))), state)
    assert new is not None and new.writer is not old.writer
    old.completed(record(1))   # in flight under the old policy: handed to the new writer
    new.completed(record(2))
    assert audit_observer(replace(policy, audit=None), state) is None   # trail removed
    await asyncio.to_thread(old.writer.join)   # both retired: their threads end
    await asyncio.to_thread(new.writer.join)
    old.completed(record(3))   # the trail is gone: counted
    assert (ids(first), ids(second)) == (["r0"], ["r1", "r2"])
    assert (old.written, old.dropped) == (3, 1)
    assert audit_trails(state).current is None
