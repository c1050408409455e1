"""The metrics observer, and the counters other parts keep that metrics publish.

``MetricsObserver`` turns observer calls into ``Metrics`` updates on the event loop
(no I/O: in-memory adds, or mmap writes in multiprocess mode). ``Sources`` reads the
monotonic ``int`` counters that the audit trails (``dropped``, ``written``) and the
linkage enricher (``counters``, ``merges.counters``) keep, and publishes what they
gained since the last look: at every scrape, and in multiprocess mode also from
``completed`` at most once a second, because only a worker itself can write its own
values file.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from guardproxy.metrics.families import Metrics
from guardproxy.observe import NullObserver

if TYPE_CHECKING:
    from prometheus_client import Counter

    from guardproxy.exchange import Exchange
    from guardproxy.observe import RequestRecord
    from guardproxy.response.events import Ending

SYNC_EVERY = 1.0   # seconds: how stale a worker's source counters may be (multiprocess)


class Sources:
    """Counters kept elsewhere, published as deltas into ``Metrics`` counters.

    A source is any object with monotonic ``int`` attributes; ``families`` maps an
    attribute to the counter it is published in. Every source ever watched is kept and
    summed (each object once, however often it is watched), so a reload that replaces
    the audit trail or the enricher never makes a published total go down."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sources: list[tuple[Any, dict[str, Counter]]] = []
        self.published: dict[int, float] = {}    # id(counter) -> total published
        self.synced = time.monotonic()

    def watch(self, source: Any, families: dict[str, Counter]) -> None:
        if not any(s is source for s, _ in self.sources):
            self.sources.append((source, families))

    def watch_trail(self, trail: Any) -> None:
        """The audit trails (``audit.trail.audit_trails``): ``dropped`` and ``written``
        read from their ``counters`` object (one per process, over every writer) when
        there is one, else from ``trail`` itself."""
        counters = getattr(trail, "counters", None)
        source = counters if isinstance(getattr(counters, "dropped", None), int) else trail
        self.watch(source, self.metrics.audit)

    def watch_linkage(self, enricher: Any) -> None:
        """A ``LinkageEnricher``: its ``counters`` and its merge feed's ``counters``."""
        self.watch(enricher.counters, self.metrics.linkage)
        feed = getattr(enricher, "merges", None)
        if feed is not None and hasattr(feed, "counters"):
            self.watch(feed.counters, self.metrics.carry)

    def sync(self) -> None:
        """Publish what every source gained since the last sync."""
        self.synced = time.monotonic()
        totals: dict[int, tuple[Counter, float]] = {}
        for source, families in self.sources:
            for name, target in families.items():
                value = getattr(source, name, None)
                if isinstance(value, int):
                    held = totals.get(id(target), (target, 0.0))[1]
                    totals[id(target)] = (target, held + value)
        for key, (target, total) in totals.items():
            gained = total - self.published.get(key, 0.0)
            if gained > 0:
                target.inc(gained)
                self.published[key] = total


class MetricsObserver(NullObserver):
    """``observe.Observer`` feeding ``Metrics``. ``decision`` counts nothing: the
    record's ``decisions`` carries every rule's verdict, allowed ones too, so counting
    here as well would count denials twice."""

    __slots__ = ("metrics", "sources")

    def __init__(self, metrics: Metrics, sources: Sources) -> None:
        self.metrics = metrics
        self.sources = sources

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        m = self.metrics
        if reserved > 0:
            m.rule_reserved.get(rule).inc(reserved)
        if charged > 0:
            m.rule_charged.get(rule).inc(charged)

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        self.metrics.store_errors.get(rule).inc()

    def completed(self, record: RequestRecord) -> None:
        m = self.metrics
        dialect, route = record.dialect, record.route
        m.requests.get(str(record.status), dialect, route, record.ending).inc()
        for d in record.decisions:
            m.decisions.get(d.rule, d.mode, "allowed" if d.allowed else "denied").inc()
            if d.seconds is not None:
                m.rule_seconds.get(d.rule).observe(d.seconds)
        if record.tokens_reserved or record.tokens_settled:
            tier = record.tier or "none"
            if record.tokens_reserved > 0:
                m.tokens_reserved.get(tier).inc(record.tokens_reserved)
            if record.tokens_settled > 0:
                m.tokens_settled.get(tier).inc(record.tokens_settled)
        if record.upstream_seconds is not None:
            m.upstream.get(dialect, route).observe(record.upstream_seconds)
        if record.ttfb_seconds is not None:
            m.ttfb.get(dialect, route).observe(record.ttfb_seconds)
        if record.canary_key_id is not None:
            m.canary_marks.inc()
        if record.ledger_entry_id is not None:
            m.ledger_writes.inc()
        if record.cluster is not None:
            # the record names the cluster, not its size: an account counted under
            # another id is linked (the cluster's smallest member shows as "false")
            m.linked_requests.get("true" if record.cluster != record.account
                                  else "false").inc()
        if m.multiprocess and time.monotonic() - self.sources.synced >= SYNC_EVERY:
            self.sources.sync()
