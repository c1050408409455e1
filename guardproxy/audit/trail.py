"""The audit trail as an observer: ``completed(record)`` -> one JSON line (``line``),
written off the event loop (``writer``).

``audit_observer(policy, state)`` returns the policy's trail. The process's writers
live in the state (``state.extra(AUDIT_KEY, AuditTrails)``), so a reload keeps the
file, the thread and the chain when ``path``, ``max_bytes``, ``backups``, ``chain`` and
``queue`` are unchanged (``include`` is applied when the record is made, not here).
When they change, the old writer is retired: it writes what it holds, then closes, and
lines still arriving for it (requests in flight under the old policy) go to the new
one, which opens the file only after the old one has closed it. A reload that removes
``audit:`` closes the trail; lines of requests still in flight are then dropped and
counted. ``dropped`` and ``written`` (lines, since the process started, over every
writer) are for metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardproxy.audit.writer import AuditWriter, Counters
from guardproxy.observe import NullObserver

if TYPE_CHECKING:
    from guardproxy.audit.settings import AuditSettings
    from guardproxy.observe import RequestRecord
    from guardproxy.policy.model import Policy
    from guardproxy.state import State

AUDIT_KEY = ("audit", "trails")


def _writer_key(settings: AuditSettings) -> tuple[object, ...]:
    return (settings.path, settings.max_bytes, settings.backups, settings.chain,
            settings.queue)


class AuditTrails:
    """A process's audit writers (one current, earlier ones retiring) and counters."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.current: AuditWriter | None = None

    def writer_for(self, settings: AuditSettings | None) -> AuditWriter | None:
        """The writer for ``settings`` (None: no trail), retiring the current one when
        it writes differently."""
        current = self.current
        if current is not None and not current.closed and settings is not None \
                and _writer_key(current.settings) == _writer_key(settings):
            return current
        new = None
        if settings is not None:
            new = AuditWriter(settings, self.counters)
            if current is not None and current.path == new.path:
                new = AuditWriter(settings, self.counters, after=current)
        if current is not None and not current.closed:
            current.retire(new)
        self.current = new
        return new

    async def aclose(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            await current.aclose()


def audit_trails(state: State) -> AuditTrails:
    """The state's audit writers and counters (created empty on first use)."""
    return state.extra(AUDIT_KEY, AuditTrails)


class AuditTrail(NullObserver):
    """The observer: one line per completed request; other events are not its job."""

    def __init__(self, trails: AuditTrails, writer: AuditWriter) -> None:
        self.trails = trails
        self.writer = writer

    @property
    def dropped(self) -> int:
        """Lines dropped (queue full, write errors, trail closed) by this process."""
        return self.trails.counters.dropped

    @property
    def written(self) -> int:
        return self.trails.counters.written

    def completed(self, record: RequestRecord) -> None:
        self.writer.submit(record)

    async def aclose(self) -> None:
        """Flush and close the trail (lifespan shutdown); waits off the loop."""
        await self.trails.aclose()


def audit_observer(policy: Policy, state: State) -> AuditTrail | None:
    """The observer writing ``policy.audit``'s trail, or None without ``audit:``."""
    trails = audit_trails(state)
    writer = trails.writer_for(policy.audit)
    return AuditTrail(trails, writer) if writer is not None else None
