"""``guardproxy ingest --policy P LOG.jsonl... [--export OUT.json]``: backfill linkage from history.

One JSON object per line (other keys are ignored, so richer lines can be fed as they are)::

    {"time": 1764460800.0, "account": "acct-1", "ip": "203.0.113.9",
     "headers": {"user-agent": "…", "x-device-id": "…"}, "prompt": "…"}

``time`` is unix seconds or an RFC 3339 string with an offset (``2025-11-30T00:00:00Z``),
from 2000-01-01 to one day after the machine's clock (one far-future record would make the
final rebuild expire every link); ``ip`` is read as the proxy reads client addresses (a
port and brackets are dropped: ``[2001:db8::1]:443``); ``account`` is trimmed;
``headers`` and ``prompt`` may be left out. The proxy's own audit trail (``audit:``) is
such a log as it is: its lines carry ``time``, ``account``, ``ip`` and, when a rule
opted in, ``prompt`` (no headers: they may hold linkage raw values); lines of denied
requests count like any other, and a line of a request no account was found for
(``"account": null`` with a ``request_id``) is skipped and counted, not reported. Several
LOGs are read one after another as one history; the rotations of one file
(``audit.jsonl.2``, ``.1``, ``audit.jsonl``) oldest first, whatever order they are named
in. Each record goes through the engine the proxy
uses (``evidence.observe`` → ``LinkGraph.record``, the prompt and time to the
``PairFinder`` → ``record_pairs``) at the record's own time, so windows, expiry and
co-activity work on history; clusters are rebuilt every ``linkage.rebuild_every`` of log
time and once at the end, as of the last record. Account attributes (and org) come from
the policy's accounts file; an account it lacks is taken as a bare account of its own
org, as a trusted gateway's account would be. A bad line is reported as
``FILE:LINE: reason`` and skipped, never fatal. The records should be in time order (an
access log is); records older than one before them are counted in the summary.

The graph is private to the run (the result is ``--export``) unless ``--store`` feeds
the policy's own store: with a Redis state, the graph every proxy shares and
``guardproxy linkage`` reads. Feeding a log twice adds nothing the first run did not
(sightings and pair evidence are sets with first/last times).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click

from guardproxy.identity.client_ip import parse_ip
from guardproxy.linkage.api import Cluster, Graph, LinkageStore
from guardproxy.linkage.cohort import CoHeld
from guardproxy.linkage.enricher import MAX_PROMPT_CHARS
from guardproxy.linkage.evidence import observe
from guardproxy.linkage.graph import LinkGraph
from guardproxy.linkage.memory import MemoryLinkageStore
from guardproxy.linkage.settings import LinkageSettings
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.model import Account

MAX_REPORTED = 1000   # bad lines reported one by one; the rest only counted
EARLIEST = 946_684_800.0   # 2000-01-01T00:00:00Z: older is a corrupt time, not history
MAX_AHEAD = 86_400.0       # seconds a record may be ahead of the clock (skew, time zones)


@dataclass(frozen=True, slots=True)
class Record:
    time: float                      # unix seconds
    account: str
    ip: str                          # "" when the line gave none
    headers: Mapping[str, str]       # names in lower case
    prompt: str | None


def parse_time(value: Any, now: float | None = None) -> float:
    """Unix seconds (a number, or a string of one) or an RFC 3339 date-time with an
    offset, as unix seconds, from ``EARLIEST`` to ``MAX_AHEAD`` after ``now`` (default:
    the clock). Raises ``ValueError`` with the reason."""
    seconds = _seconds(value)
    latest = (time.time() if now is None else now) + MAX_AHEAD
    if not EARLIEST <= seconds <= latest:
        raise ValueError(f"time {str(value)[:40]!r} is outside 2000-01-01 .. one day "
                         "from now")
    return seconds


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("time must be unix seconds or an RFC 3339 string")
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                # RFC 3339 allows a lower-case t/z and a space for T
                when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"time {text[:40]!r} is neither unix seconds nor "
                                 "RFC 3339 (2025-11-30T00:00:00Z)") from None
            if when.tzinfo is None:
                raise ValueError(f"time {text[:40]!r} has no offset (add Z or +hh:mm)") \
                    from None
            return when.timestamp()
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        raise ValueError("time must be unix seconds or an RFC 3339 string")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"time {value!r} is not a unix time")
    return seconds


class Unattributed(ValueError):
    """An audit line of a request no account was found for: nothing to link."""


def parse_record(text: str, now: float | None = None) -> Record:
    """One line of the ingest format (``now``: see ``parse_time``); raises
    ``ValueError`` saying what is wrong (``Unattributed`` for an audit line without an
    account)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("a line must be a JSON object")
    if "time" not in doc:
        raise ValueError("missing 'time'")
    when = parse_time(doc["time"], now)
    account = doc.get("account")
    if account is None and "request_id" in doc and "account" in doc:
        raise Unattributed("an audit line without an account")
    if not isinstance(account, str) or not account.strip():
        raise ValueError("'account' must be a non-empty string")
    ip = doc.get("ip") or ""
    address = parse_ip(ip) if isinstance(ip, str) and ip else None
    if not isinstance(ip, str) or (ip and address is None):
        raise ValueError(f"'ip' is not an IP address: {str(ip)[:60]!r}")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("'headers' must be an object of strings")
    prompt = doc.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return Record(when, account.strip(), str(address) if address is not None else "",
                  {k.lower(): v for k, v in headers.items()},
                  prompt[:MAX_PROMPT_CHARS] if prompt else None)


def read_records(lines: IO[bytes], name: str, bad: Callable[[str, int, str], None],
                 progress: Callable[[int], None] = lambda n: None,
                 unattributed: Callable[[], None] = lambda: None) -> Iterator[Record]:
    """The records of a file opened in binary; each bad line goes to ``bad(name, line,
    reason)`` and is skipped; blank lines are ignored; ``progress`` gets bytes read;
    an audit line without an account calls ``unattributed()`` and is skipped. Times
    are checked against the clock when the reading starts."""
    now = time.time()
    for number, raw in enumerate(lines, 1):
        progress(len(raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(name, number, f"not UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            yield parse_record(text, now)
        except Unattributed:
            unattributed()
        except ValueError as exc:
            bad(name, number, str(exc))


class Replay:
    """The proxy's linkage engine fed records at their own time (see the module doc).

    ``store``: where the graph goes; by default a private in-memory graph
    (``MemoryLinkageStore``; its ``LinkGraph`` is ``graph``), or the policy's own store
    (Redis: the graph the proxies share). Clusters are rebuilt every
    ``settings.rebuild_every`` of record time."""

    def __init__(self, settings: LinkageSettings, accounts: Mapping[str, Account],
                 store: LinkageStore | None = None) -> None:
        self.settings = settings
        self.accounts = accounts                     # account id -> account
        self.graph: LinkGraph | None = None   # the in-memory engine, when it is one
        if store is None:
            memory = MemoryLinkageStore(settings, on_event=None)
            self.graph, store = memory.graph_engine, memory
        self.store: LinkageStore = store
        self.pairs = PairFinder(settings)
        self.cohort = CoHeld(settings)
        self.seen: set[str] = set()
        self.unknown: set[str] = set()
        self.records = 0
        self.out_of_order = 0
        self.latest = -math.inf
        self.rebuilt: float | None = None

    async def feed(self, record: Record) -> Cluster:
        """Record one request; its cluster as the proxy would have seen it (before the
        pairs its prompt completes, which the proxy finds off the request path)."""
        now = record.time
        if now < self.latest:
            self.out_of_order += 1
        self.latest = max(self.latest, now)
        every = self.settings.rebuild_every
        if self.rebuilt is None:
            self.rebuilt = now
        elif every > 0 and now - self.rebuilt >= every:
            await self.store.rebuild(now)
            self.rebuilt = now
        account = self.accounts.get(record.account)
        if account is None:
            self.unknown.add(record.account)
            account = Account(id=record.account, org=record.account, tier="default")
        self.seen.add(account.id)
        self.records += 1
        evidence = observe(self.settings, account, record.ip, record.headers)
        co_held = self.cohort.add(account.id, evidence, now)
        cluster = await self.store.record(account.id, evidence, now, co_held)
        found = self.pairs.add(account.id, record.prompt, now)
        if found:
            await self.store.record_pairs(found, now)
        return cluster

    async def finish(self) -> Graph:
        """The graph as of the last record (evidence older than the window forgotten)."""
        if self.latest > -math.inf:
            await self.store.rebuild(self.latest)
        return await self.store.graph()


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Summary:
    lines: int
    skipped: int
    records: int
    accounts: int
    unknown: int
    out_of_order: int
    graph: Graph
    unattributed: int = 0   # audit lines of requests without an account

    def text(self, name: str) -> str:
        sizes = [len(accounts) for _, accounts, _ in self.graph.clusters]
        by_signal: dict[str, int] = {}
        for value in self.graph.hot_values:
            by_signal[value.signal] = by_signal.get(value.signal, 0) + 1
        hot = ", ".join(f"{s} {n}" for s, n in sorted(by_signal.items()))
        out = (f"{name}: {_n(self.lines, 'line')} read, {self.skipped:,} skipped, "
               f"{_n(self.records, 'record')}"
               + (f" ({self.unattributed:,} audit lines without an account skipped)"
                  if self.unattributed else "")
               + f"; {_n(self.accounts, 'account')}"
               + (f" ({self.unknown:,} not in the accounts file)" if self.unknown else "")
               + f"; {_n(len(sizes), 'cluster')} of 2+ accounts"
               + (f" (largest {max(sizes):,}, {sum(sizes):,} accounts in all)" if sizes else "")
               + f"; {_n(len(self.graph.hot_values), 'hot value')}"
               + (f" ({hot})" if hot else ""))
        if self.out_of_order:
            were = "was" if self.out_of_order == 1 else "were"
            out += (f"\n{name}: {_n(self.out_of_order, 'record')} {were} older than one "
                    "before it: sort the log by time for exact windows and co-activity")
        return out


async def ingest(paths: Path | Sequence[Path], replay: Replay,
                 bad: Callable[[str, int, str], None],
                 progress: Callable[[int], None] = lambda n: None) -> Summary:
    """Feed every record of ``paths`` (one after another) to ``replay`` and finish it."""
    lines = skipped = unattributed = 0

    def on_bad(name: str, number: int, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        bad(name, number, reason)

    def counted(n: int) -> None:
        nonlocal lines
        lines += 1
        progress(n)

    def no_account() -> None:
        nonlocal unattributed
        unattributed += 1

    for path in [paths] if isinstance(paths, Path) else paths:
        with path.open("rb") as file:
            for record in read_records(file, str(path), on_bad, counted, no_account):
                await replay.feed(record)
    return Summary(lines, skipped, replay.records, len(replay.seen), len(replay.unknown),
                   replay.out_of_order, await replay.finish(), unattributed)


@click.command("ingest")
@click.argument("logs", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--export", "export", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the linkage graph here as JSON "
              "(the shape of 'guardproxy linkage export --format json').")
@click.option("--store", "into_store", is_flag=True,
              help="Feed the policy's own linkage store (a Redis state: the graph every "
              "proxy shares) instead of a private in-memory graph.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal and the "
              "log is over 1 MiB).")
def ingest_command(logs: tuple[Path, ...], policy_path: Path, export: Path | None,
                   into_store: bool, progress: bool | None) -> None:
    """Feed the recorded requests of LOGS (JSON lines: time, account, ip, headers,
    prompt; the proxy's audit trail is one) through the policy's account-linkage engine
    at their own times, then print a summary (and write the graph with --export). The
    rotations of one file are read oldest first. Bad lines are reported as FILE:LINE:
    reason and skipped."""
    from guardproxy.audit.verify import rotation_order
    from guardproxy.cli.serve import _load_or_exit
    from guardproxy.errors import StoreError
    from guardproxy.linkage.enricher import open_linkage_store
    from guardproxy.state import open_state, scheme_of

    policy = _load_or_exit(policy_path)
    settings = policy.linkage
    if settings is None:
        click.echo(f"{policy_path}: the policy has no 'linkage:' section: nothing to "
                   "ingest into", err=True)
        sys.exit(1)
    if into_store and scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory://, whose graph lives inside the proxy "
                   "process: --store has nothing to feed (the result is --export)", err=True)
        sys.exit(1)
    accounts = {a.id: a for a in policy.keys.values()}
    paths = [Path(p) for p in rotation_order([str(p) for p in logs])]
    size = sum(p.stat().st_size for p in paths)
    show = progress if progress is not None else (size > 1 << 20 and sys.stderr.isatty())
    # a message over a drawn bar starts a clean line (the bar redraws below it)
    clear = "\r\x1b[K" if show and sys.stderr.isatty() else ""
    reported = 0

    def bad(name: str, number: int, reason: str) -> None:
        nonlocal reported
        reported += 1
        if reported <= MAX_REPORTED:
            click.echo(f"{clear}{name}:{number}: {reason}", err=True)
        elif reported == MAX_REPORTED + 1:
            click.echo(f"{clear}{name}: more bad lines: counted, not shown", err=True)

    async def run() -> Summary:
        if not into_store:
            return await ingest(paths, Replay(settings, accounts), bad, bar.update)
        state = open_state(policy.state, policy.key_prefix)
        store = open_linkage_store(settings, state)
        try:
            return await ingest(paths, Replay(settings, accounts, store), bad, bar.update)
        finally:
            await store.aclose()
            await state.aclose()

    with click.progressbar(length=size, label="ingest", file=sys.stderr,
                           hidden=not show) as bar:
        try:
            summary = asyncio.run(run())
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
    if export is not None:
        export.write_text(json.dumps(summary.graph.as_json(), indent=1) + "\n",
                          encoding="utf-8")
    click.echo(summary.text(str(paths[0]) if len(paths) == 1 else
                            f"{paths[0]} .. {paths[-1]} ({len(paths)} files)"))
