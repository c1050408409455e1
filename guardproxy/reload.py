"""Hot reload: a policy (and its accounts file) re-read, validated aside and swapped whole.

    reloader = Reloader(policy, apply=proxy.swap, prepare=lambda p: p, interval=1.0)
    await reloader.start()            # lifespan startup: the file watcher and SIGHUP
    result = await reloader.reload()  # -> ReloadResult; never raises
    await reloader.aclose()           # lifespan shutdown

Three triggers: the watcher (a task polling the policy and accounts files' size, mtime,
ctime and inode every ``interval`` seconds; no inotify dependency, and a Kubernetes
ConfigMap's symlink swap shows as a new inode), ``SIGHUP`` (a loop signal handler, main
thread only), and ``POST /admin/reload``. Reloads run one at a time. Each parses and
validates the whole policy in a thread (``load_policy``), then ``prepare(policy)`` (the
serving overrides; ``ValueError`` refuses), then ``apply(policy)`` swaps it in on the
loop, synchronously, so no request sees half of it (``ValueError`` refuses: a changed
state URI, a changed admin listen address). A refused or invalid file keeps the old
policy, logs each ``FILE:LINE: field: message`` on its own line and counts a failure.

The watcher reloads only content it has not tried yet (a ``touch`` is not a reload; a
broken file is reported once, not every second); SIGHUP and ``POST /admin/reload`` always
reload. With ``uvicorn --workers N`` every worker runs its own watcher, so a file change
reaches every worker within ``interval``; SIGHUP goes to uvicorn's supervisor, which
replaces the workers one by one (README, "Hot reload").

Read by ``guardproxy/metrics.py`` and ``GET /admin/policy`` (plain attributes, updated
on the loop thread):

    reloads_ok      int     successful reloads since start (the first load not counted)
    reloads_failed  int     refused reloads (invalid file, changed state, I/O error)
    version         str     12 hex digits: sha256 of the policy file's bytes, then the
                            accounts file's (``policy_version``)
    source_sha256   str     64 hex digits: sha256 of the policy file alone
    accounts_sha256 str     of the accounts file ("" when the policy names none)
    loaded_at       float   epoch seconds the policy in force was loaded
    last_errors     tuple[str, ...]   the last failure's one-line errors (() after a success)
    policy          Policy  the policy in force
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guardproxy.errors import PolicyError
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy
from guardproxy.policy.source import one_line

log = logging.getLogger("guardproxy.reload")

# (size, mtime_ns, ctime_ns, inode) of each watched file; None: missing or unreadable
Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class ReloadResult:
    """``ok``: the new policy is in force; ``version``: the version in force after the
    attempt; ``errors``: one line each (empty when ok)."""

    ok: bool
    version: str
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    version: str            # 12 hex digits
    source_sha256: str
    accounts_sha256: str    # "" when there is no accounts file


def watched_files(policy: Policy) -> tuple[Path, ...]:
    """The files a policy is made of: itself and its accounts file."""
    files = [policy.source]
    if policy.accounts.keys_file is not None:
        files.append(policy.accounts.keys_file)
    return tuple(files)


def policy_version(policy: Policy) -> Digest:
    """The digest of the files as they are now (an unreadable file hashes as empty)."""
    parts = []
    for path in watched_files(policy):
        try:
            parts.append(path.read_bytes())
        except OSError:
            parts.append(b"")
    whole = hashlib.sha256()
    for part in parts:  # length-prefixed: moving bytes between the files changes it
        whole.update(len(part).to_bytes(8, "big") + part)
    return Digest(whole.hexdigest()[:12], hashlib.sha256(parts[0]).hexdigest(),
                  hashlib.sha256(parts[1]).hexdigest() if len(parts) > 1 else "")


def signature(files: tuple[Path, ...]) -> Signature:
    out: list[tuple[int, int, int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)  # follows symlinks: a ConfigMap swap changes the inode
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


class Reloader:
    """See the module docstring. ``apply`` and ``prepare`` raise ``ValueError`` to refuse
    a policy (its message is the reason given); ``interval`` (seconds) None: no watcher;
    ``report(ok, version)`` is told of every attempt (version "" on failure): the
    metrics' ``Metrics.reloaded``."""

    def __init__(self, policy: Policy, apply: Callable[[Policy], None], *,
                 prepare: Callable[[Policy], Policy] | None = None,
                 interval: float | None = 1.0,
                 report: Callable[[bool, str], None] | None = None) -> None:
        self.policy = policy
        self.report = report
        self.apply = apply
        self.prepare = prepare or (lambda p: p)
        self.interval = interval
        self.source = policy.source
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_errors: tuple[str, ...] = ()
        self.loaded_at = time.time()
        digest = policy_version(policy)
        self.version, self.source_sha256 = digest.version, digest.source_sha256
        self.accounts_sha256 = digest.accounts_sha256
        self._files = watched_files(policy)
        self._seen = signature(self._files)
        self._tried = digest.version   # the watcher's last attempt, by content
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._signalled: set[asyncio.Task[ReloadResult]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the watcher and the SIGHUP handler on the running loop."""
        loop = self._loop = asyncio.get_running_loop()
        if self.interval is not None and self._watcher is None:
            self._watcher = loop.create_task(self._watch(self.interval))
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is not None:
            try:
                loop.add_signal_handler(sighup, self._on_sighup)
            except (ValueError, RuntimeError, NotImplementedError):
                # not the main thread (an embedding server, a test): no SIGHUP here
                log.debug("SIGHUP reload unavailable in this thread")
                self._loop = None

    async def aclose(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for task in list(self._signalled):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.source)
        task = asyncio.get_running_loop().create_task(self.reload())
        self._signalled.add(task)  # held until done: the loop keeps weak references
        task.add_done_callback(self._signalled.discard)

    async def reload(self) -> ReloadResult:
        """Re-read the files and swap the policy in; never raises (bar cancellation)."""
        async with self._lock:
            files_before = watched_files(self.policy)
            seen = signature(files_before)
            try:
                # what the watcher compares with: this content was tried, whatever comes
                before = (await asyncio.to_thread(policy_version, self.policy)).version
                self._tried = before
                policy = await asyncio.to_thread(self._load)
                digest = await asyncio.to_thread(policy_version, policy)
                if (await asyncio.to_thread(policy_version, self.policy)).version != before:
                    # a file was replaced while it was parsed: which bytes were read is
                    # not known, so the next poll must load again whatever it finds
                    raced = True
                else:
                    raced = False
                self.apply(policy)   # synchronous: requests see the old or the new, whole
            except PolicyError as exc:
                return self._failed([one_line(str(p)) for p in exc.problems], seen)
            except ValueError as exc:
                return self._failed([one_line(f"{self.source}: not reloaded: {exc}")], seen)
            except Exception as exc:   # a bug or an I/O error: still the old policy
                log.exception("reloading %s failed", self.source)
                return self._failed([one_line(f"{self.source}: not reloaded: "
                                              f"{type(exc).__name__}: {exc}")], seen)
            self.policy, self.loaded_at, self.last_errors = policy, time.time(), ()
            self.version, self.source_sha256 = digest.version, digest.source_sha256
            self.accounts_sha256 = digest.accounts_sha256
            self._files, self._tried = watched_files(policy), digest.version
            # the stat taken before reading: a write after it shows on the next poll
            self._seen = seen if self._files == files_before else signature(self._files)
            if raced:
                self._tried, self._seen = "", seen
            self.reloads_ok += 1
            log.info("policy reloaded from %s: version %s, %d rules", self.source,
                     self.version, len(policy.rules))
            self._report(True)
            return ReloadResult(True, self.version)

    def _load(self) -> Policy:
        return self.prepare(load_policy(self.source))

    def _failed(self, errors: list[str], seen: Signature) -> ReloadResult:
        self.reloads_failed += 1
        self.last_errors = tuple(errors)
        self._seen = seen
        for line in errors:
            log.error("%s", line)
        log.error("policy not reloaded: keeping version %s (%d reload failures)",
                  self.version, self.reloads_failed)
        self._report(False)
        return ReloadResult(False, self.version, self.last_errors)

    def _report(self, ok: bool) -> None:
        if self.report is not None:
            try:
                self.report(ok, self.version if ok else "")
            except Exception:  # metrics must never undo a reload
                log.exception("reporting a reload failed")

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._poll(interval)
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("watching %s failed", self.source)

    async def _poll(self, interval: float) -> None:
        now = signature(self._files)
        if now == self._seen:
            return
        # a file being written in place: wait until it stops changing (bounded)
        for _ in range(4):
            await asyncio.sleep(interval / 4)
            settled = signature(self._files)
            if settled == now:
                break
            now = settled
        digest = await asyncio.to_thread(policy_version, self.policy)
        if digest.version == self._tried:   # touched, or the same broken file again
            self._seen = now
            return
        log.info("%s changed: reloading", self.source)
        await self.reload()
