"""The audit writer: a bounded queue the event loop fills and a thread that writes.

    writer = AuditWriter(settings, counters)
    writer.submit(record)        # on the loop: never blocks, never raises
    await writer.aclose()        # flushes, closes the file, joins the thread

``submit`` appends to a deque under a lock (O(1)); when ``settings.queue`` lines are
waiting, the line is dropped and counted (``counters.dropped``) and one warning is
logged per burst (one more, with the count, when the writer catches up). The thread
takes every waiting line at once, formats it (``line``), writes and flushes once per
batch (no fsync: a line reaches the OS within one batch).

Files: opened in append mode; a file ending in a torn line (a crash mid-write) gets a
newline first, so the next line stands alone. Rotation follows
``logging.handlers.RotatingFileHandler``: before a line would take the file past
``max_bytes`` it is renamed ``FILE.1`` (``FILE.1`` -> ``FILE.2`` … the one past
``backups`` deleted; ``backups: 0`` discards the full file) — done here rather than
with the handler so the bytes written are exactly the bytes hashed, the chain
continues across rotations and restarts, and an I/O error is counted, not printed.
``{pid}`` in the path is the process id (one file per worker). ``"-"``: stdout, no
rotation. With ``chain``, each line's ``prev`` is the hash of the line before it: on
start, the file's last line (or ``FILE.1``'s when the file is empty or missing), else
``line.GENESIS``; after a write error the file is reopened and the chain picks up
from what is really in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from typing import IO

from guardproxy.audit.line import GENESIS, audit_fields, encode, line_hash
from guardproxy.audit.settings import AuditSettings
from guardproxy.observe import RequestRecord

log = logging.getLogger("guardproxy.audit")
TAIL_CHUNK = 64 * 1024
LINGER = 0.02   # seconds the writer waits for more lines after the first: a line is on disk
                # within ~20 ms, and a busy proxy wakes the thread 50 times a second at most


class Counters:
    """Lines written and dropped by every writer of a process (for metrics); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.written = 0
        self.dropped = 0

    def add(self, written: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.written += written
            self.dropped += dropped


def resolve_path(path: str) -> str:
    """The file a writer of this process opens: ``{pid}`` replaced."""
    return path.replace("{pid}", str(os.getpid()))


def last_line(path: str) -> bytes | None:
    """The last line of a regular file (without its newline; a torn last line as it
    is), or None when the file is missing, empty or not a regular file."""
    try:
        # a FIFO (a log shipper's pipe) is never opened to read: that would wait for a writer
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return None
            tail = b""
            pos = end
            while pos > 0:
                step = min(TAIL_CHUNK, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                body = tail[:-1] if tail.endswith(b"\n") else tail
                cut = body.rfind(b"\n")
                if cut >= 0:
                    return body[cut + 1:]
            return tail[:-1] if tail.endswith(b"\n") else tail
    except FileNotFoundError:
        return None


class AuditWriter:
    """Writes ``settings``' trail from a thread started by the first ``submit``.

    ``after``: a retired writer of the same file, finished before this one opens it.
    ``closed`` once ``aclose``/``close``/``retire`` was called: later lines go to the
    ``successor`` given to ``retire``, or are dropped and counted."""

    def __init__(self, settings: AuditSettings, counters: Counters,
                 after: AuditWriter | None = None) -> None:
        self.settings = settings
        self.path = settings.path if settings.path == "-" else resolve_path(settings.path)
        self.counters = counters
        self.closed = False
        self._after = after
        self._successor: AuditWriter | None = None
        self._cond = threading.Condition()
        self._items: deque[RequestRecord] = deque()
        self._burst = 0           # lines dropped since the writer last caught up
        self._thread: threading.Thread | None = None
        # the writer thread's own (never touched on the loop)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._prev: str | None = None
        self._failing = False

    # -- the event loop's side ---------------------------------------------------------
    def submit(self, record: RequestRecord) -> None:
        successor = None
        with self._cond:
            if self.closed:
                successor = self._successor
                if successor is None:
                    self._drop("the trail is closed")
            elif len(self._items) >= self.settings.queue:
                self._drop(f"{len(self._items)} lines wait for the writer")
            else:
                self._items.append(record)
                if self._thread is None:
                    self._start()
                elif len(self._items) == 1:
                    self._cond.notify()
        if successor is not None:
            successor.submit(record)

    def _drop(self, why: str) -> None:
        self.counters.add(dropped=1)
        self._burst += 1
        if self._burst == 1:   # once per burst; the count comes when it ends
            log.warning("audit trail %s: dropping lines (%s); counted in "
                        "guardproxy_audit_dropped_total", self.path, why)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="guardproxy-audit",
                                        daemon=True)
        self._thread.start()

    def retire(self, successor: AuditWriter | None) -> None:
        """Stop taking lines (they go to ``successor``; None: dropped) and let the
        thread finish what it holds; does not wait."""
        with self._cond:
            self.closed = True
            self._successor = successor
            self._cond.notify()

    def close(self) -> None:
        """``retire(None)`` and wait until every line taken is written (blocking)."""
        self.retire(self._successor)
        self.join()

    def join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- the writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        if self._after is not None:
            self._after.join()
            self._after = None
        self._try_open()   # before taking lines: a file that blocks (a FIFO) holds them queued
        while True:
            with self._cond:
                while not self._items and not self.closed:
                    self._cond.wait()
                lingering = not self.closed
            if lingering:   # gather what follows: one wake-up (and write) per LINGER, not
                time.sleep(LINGER)   # per line, which would cost every request a GIL hand-off
            with self._cond:
                batch, self._items = self._items, deque()
                burst, self._burst = self._burst, 0
                closing = self.closed
            if batch:
                self._write(batch)
            if burst:
                log.warning("audit trail %s: %d lines dropped in that burst", self.path, burst)
            if closing:
                break
        self._close_file()

    def _try_open(self) -> None:
        try:
            self._open()
        except Exception as exc:   # never fatal: the first batch tries again
            log.error("audit trail %s: %s; retrying with the next line", self.path, exc)
            self._failing = True

    def _write(self, batch: deque[RequestRecord]) -> None:
        bad = 0
        try:
            if self._file is None:
                self._open()
            for record in batch:
                try:
                    data = encode(audit_fields(record),
                                  self._prev if self.settings.chain else None) + b"\n"
                except (TypeError, ValueError):
                    log.exception("audit trail %s: a record could not be written", self.path)
                    self.counters.add(dropped=1)
                    bad += 1
                    continue
                self._write_line(data)
            assert self._file is not None
            self._file.flush()
        except Exception as exc:   # disk full, a bug: counted and logged, never fatal
            lost = len(batch) - bad
            self.counters.add(dropped=lost)
            if not self._failing:
                log.error("audit trail %s: %s; %d lines counted as dropped (some may have "
                          "reached the file); reopening on the next line", self.path, exc, lost)
            self._failing = True
            self._close_file()
            self._prev = None   # resume from what the file really holds
            return
        if self._failing:
            log.warning("audit trail %s: writing again", self.path)
        self._failing = False
        self.counters.add(written=len(batch) - bad)

    def _write_line(self, data: bytes) -> None:
        limit = self.settings.max_bytes
        if self.path != "-" and limit and self._size and self._size + len(data) > limit:
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)
        if self.settings.chain:
            self._prev = line_hash(data[:-1])

    def _open(self) -> None:
        if self.path == "-":
            self._file = sys.stdout.buffer
            self._prev = self._prev or GENESIS
            return
        tail = last_line(self.path)
        if self._prev is None and self.settings.chain:
            before = tail if tail is not None else last_line(self.path + ".1")
            self._prev = line_hash(before) if before is not None else GENESIS
        file = open(self.path, "ab")   # noqa: SIM115 - held open across batches
        info = os.fstat(file.fileno())
        self._size = info.st_size if stat.S_ISREG(info.st_mode) else 0
        self._file = file
        if stat.S_ISREG(info.st_mode):
            self._lock(file)
        if tail is not None and self._size and not self._ends_with_newline():
            file.write(b"\n")   # a torn last line stays a line of its own
            self._size += 1

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _lock(self, file: IO[bytes]) -> None:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("audit trail %s: another process writes this file (several "
                      "workers?): their lines interleave and rotation and the chain "
                      "break; put {pid} in audit.path", self.path)

    def _rotate(self) -> None:
        self._close_file()
        backups = self.settings.backups
        if backups == 0:
            os.remove(self.path)
        else:
            for i in range(backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is None or self.path == "-":
            return
        with contextlib.suppress(OSError):
            file.close()
