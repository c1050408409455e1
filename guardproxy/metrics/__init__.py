"""Prometheus metrics: one observer per process, and ``/metrics``.

API (for the app, the serve command and the reloader)::

    metrics_observer(policy, state) -> MetricsObserver     # GuardMiddleware._observers
    metrics_for(state) -> MetricsObserver                  # the same object, for:
    metrics_app(metrics_for(state)) -> ASGIApp             # mount at GET /metrics
    metrics_for(state).metrics.loaded(version: str)        # at start: the policy served
    metrics_for(state).metrics.reloaded(ok: bool, version: str = "")   # every reload try
    prepare_multiprocess_dir(path) -> Path                 # serve, --workers > 1, in the
    os.environ[MULTIPROC_ENV] = str(path)                  #   parent, before workers start
    worker_exited(pid: int)                                # a worker died: drop its gauges

The observer lives in ``state.extra(KEY, …)`` so a reload keeps it; each
``metrics_observer`` call (start, every reload) also starts publishing the audit
trails' ``counters`` (``dropped``, ``written``) and the policy's linkage enricher
``counters`` (both kept in the state too, so the calls find the objects the
middleware uses). ``version`` is a short
label value: 12 hex digits of the policy's hash, say. Multiprocess mode is chosen by
prometheus_client when it is first imported: the env var must be set before the
workers start (uvicorn spawns fresh interpreters, so setting it in the parent works).

Families (labels; counters end in ``_total``, durations in seconds):
    guardproxy_requests_total{status,dialect,route,ending}   status "0": nothing sent
    guardproxy_decisions_total{rule,mode,outcome}            mode enforce|shadow;
                                                             outcome allowed|denied
    guardproxy_tokens_reserved_total{tier}, guardproxy_tokens_settled_total{tier}
        per request, the largest budget rule's; tier "none" without an account
    guardproxy_budget_reserved_tokens_total{rule}, guardproxy_budget_charged_tokens_total{rule}
    guardproxy_upstream_seconds{dialect,route}, guardproxy_ttfb_seconds{dialect,route}
        histograms: forwarding to the response's end / to its first body byte
    guardproxy_store_errors_total{rule}
    guardproxy_reloads_total{result}                         success|failure
    guardproxy_policy_info{version}                          live processes serving it
    guardproxy_policy_loaded_timestamp_seconds
    guardproxy_audit_dropped_total, guardproxy_audit_written_total   lines
    guardproxy_canary_marks_total, guardproxy_ledger_writes_total
    guardproxy_linkage_requests_total{linked}                true|false
    guardproxy_linkage_{recorded,store_errors,prompts_queued,prompts_dropped,pairs,
        pair_errors,rebuilds}_total, guardproxy_linkage_carry_{merges,batches,errors,
        dropped}_total                                       the enricher's counters

No label takes an account, key, IP or model: rule, tier, route and dialect come from
the policy and the dialect, status from HTTP, so cardinality is bounded by the policy.
State-store latency: ``guardproxy_rule_seconds{rule}``, the time each rule's calls took
deciding a request (``flow.Pipeline`` times them; on Redis, the rule's round trips). The
linkage enricher's store call and the settles after the response are not timed yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from guardproxy.metrics.exposition import (
    MULTIPROC_ENV,
    metrics_app,
    prepare_multiprocess_dir,
    worker_exited,
)
from guardproxy.metrics.families import Metrics
from guardproxy.metrics.observer import MetricsObserver, Sources

if TYPE_CHECKING:
    from guardproxy.policy.model import Policy
    from guardproxy.state import State

KEY = "metrics"   # state.extra key of the process's MetricsObserver

__all__ = [
    "KEY",
    "MULTIPROC_ENV",
    "Metrics",
    "MetricsObserver",
    "metrics_app",
    "metrics_for",
    "metrics_observer",
    "prepare_multiprocess_dir",
    "worker_exited",
]


def _open() -> MetricsObserver:
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    return MetricsObserver(metrics, Sources(metrics))


def metrics_for(state: State) -> MetricsObserver:
    """The process's observer (``.metrics``: the families), created on first use."""
    return state.extra(KEY, _open)


def metrics_observer(policy: Policy, state: State) -> MetricsObserver:
    """The process's observer, now also publishing the audit counters and ``policy``'s
    linkage counters. Never None: metrics cost microseconds a request; always on."""
    # imported here: the audit and linkage packages may import observer helpers
    from guardproxy.audit.trail import audit_trails
    from guardproxy.linkage.enricher import linkage_enricher

    observer = metrics_for(state)
    # the process's audit counters (one object over every writer and reload)
    observer.sources.watch_trail(audit_trails(state))
    enricher = linkage_enricher(policy, state)
    if enricher is not None:
        observer.sources.watch_linkage(enricher)
    return observer
