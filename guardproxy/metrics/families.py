"""The process's metric families, all in one registry handed in by the caller.

``Metrics(registry)`` defines every ``guardproxy_*`` family (see the package docstring
for names and labels). Label children are cached per family (``Family.get``), so the
request path pays one dict lookup per family instead of ``labels()``'s validation.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values

M = TypeVar("M", Counter, Gauge, Histogram)

# LLM calls run from tens of milliseconds (a cached refusal) to minutes (long streams)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RULE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

# the audit trail's counters (attribute -> family); the writer's log names the first
AUDIT_FAMILIES: dict[str, tuple[str, str]] = {
    "dropped": ("guardproxy_audit_dropped_total",
                "Audit lines dropped: the writer's queue was full or the trail closed."),
    "written": ("guardproxy_audit_written_total", "Audit lines written."),
}
# linkage counter dataclass field -> (metric name, help); one family per field because
# the fields count different things (summing "recorded" and "dropped" means nothing)
LINKAGE_FAMILIES: dict[str, tuple[str, str]] = {
    "recorded": ("guardproxy_linkage_recorded_total",
                 "Requests whose linkage evidence was recorded."),
    "store_errors": ("guardproxy_linkage_store_errors_total",
                     "Requests whose linkage record the store refused."),
    "queued": ("guardproxy_linkage_prompts_queued_total",
               "Prompts handed to the linkage pair finder."),
    "dropped": ("guardproxy_linkage_prompts_dropped_total",
                "Prompts the linkage pair finder dropped: its queue was full."),
    "pairs": ("guardproxy_linkage_pairs_total",
              "Pair evidence (similar prompts, co-activity) found off the request path."),
    "pair_errors": ("guardproxy_linkage_pair_errors_total",
                    "Pair records or rebuilds the linkage store refused."),
    "rebuilds": ("guardproxy_linkage_rebuilds_total", "Linkage graph rebuilds."),
}
CARRY_FAMILIES: dict[str, tuple[str, str]] = {
    "merges": ("guardproxy_linkage_carry_merges_total",
               "Cluster merges handed to the usage carry (second passes included)."),
    "batches": ("guardproxy_linkage_carry_batches_total",
                "Usage-carry batches that succeeded."),
    "errors": ("guardproxy_linkage_carry_errors_total",
               "Usage-carry batches that failed (their merges are not carried)."),
    "dropped": ("guardproxy_linkage_carry_dropped_total",
                "Cluster merges dropped before the usage carry: too many were waiting."),
}


def multiprocess_active() -> bool:
    """Whether prometheus_client writes values to ``PROMETHEUS_MULTIPROC_DIR`` files: it
    decides once, when first imported, from the environment."""
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


class Family(Generic[M]):
    """A labelled family with its children cached by label values (a tuple of str)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self.children: dict[tuple[str, ...], M] = {}

    def get(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every family, registered in ``registry`` (one ``Metrics`` per process: in
    multiprocess mode two of them would overwrite each other's files).

    ``loaded(version)`` / ``reloaded(ok, version)`` are for whoever loads policies;
    ``version`` is a short label value (e.g. 12 hex digits of the policy's hash)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.multiprocess = multiprocess_active()
        r = registry
        self.requests = Family(Counter(
            "guardproxy_requests_total", "Guarded requests, by what the client was sent "
            "(status 0: nothing, it left first) and how the exchange ended.",
            ("status", "dialect", "route", "ending"), registry=r))
        self.decisions = Family(Counter(
            "guardproxy_decisions_total", "Rule decisions, enforced and shadow.",
            ("rule", "mode", "outcome"), registry=r))
        self.tokens_reserved = Family(Counter(
            "guardproxy_tokens_reserved_total",
            "Tokens reserved by budget rules (the largest rule's, per request).",
            ("tier",), registry=r))
        self.tokens_settled = Family(Counter(
            "guardproxy_tokens_settled_total",
            "Tokens charged when budget leases settled (the largest rule's, per request).",
            ("tier",), registry=r))
        self.rule_reserved = Family(Counter(
            "guardproxy_budget_reserved_tokens_total", "Tokens reserved, per budget rule.",
            ("rule",), registry=r))
        self.rule_charged = Family(Counter(
            "guardproxy_budget_charged_tokens_total", "Tokens charged, per budget rule.",
            ("rule",), registry=r))
        self.upstream = Family(Histogram(
            "guardproxy_upstream_seconds", "From forwarding upstream to the response's end.",
            ("dialect", "route"), buckets=UPSTREAM_BUCKETS, registry=r))
        self.ttfb = Family(Histogram(
            "guardproxy_ttfb_seconds", "From forwarding upstream to the first body byte "
            "sent to the client (time to first token, when streaming).",
            ("dialect", "route"), buckets=TTFB_BUCKETS, registry=r))
        self.rule_seconds = Family(Histogram(
            "guardproxy_rule_seconds", "Time a rule's calls took deciding a request (its "
            "state-store round trips: reads, reservations, deferred hits).",
            ("rule",), buckets=RULE_BUCKETS, registry=r))
        self.store_errors = Family(Counter(
            "guardproxy_store_errors_total", "State-store calls that failed, per rule.",
            ("rule",), registry=r))
        self.canary_marks = Counter(
            "guardproxy_canary_marks_total", "Responses marked with a canary key.",
            registry=r)
        self.ledger_writes = Counter(
            "guardproxy_ledger_writes_total", "Responses written to the canary ledger.",
            registry=r)
        self.linked_requests = Family(Counter(
            "guardproxy_linkage_requests_total", "Requests seen by linkage, by whether the "
            "account was counted under another account's cluster id.",
            ("linked",), registry=r))
        self.reloads = Family(Counter(
            "guardproxy_reloads_total", "Policy reloads, by result (success, failure).",
            ("result",), registry=r))
        # livesum: the number of live workers serving each version (1 with one process)
        self.policy_info = Family(Gauge(
            "guardproxy_policy_info", "Processes serving each policy version.",
            ("version",), multiprocess_mode="livesum", registry=r))
        self.policy_loaded = Gauge(
            "guardproxy_policy_loaded_timestamp_seconds",
            "Unix time the serving policy was loaded.", multiprocess_mode="livemax",
            registry=r)
        self.audit = {field: Counter(name, text, registry=r)
                      for field, (name, text) in AUDIT_FAMILIES.items()}
        self.linkage = {field: Counter(name, text, registry=r)
                        for field, (name, text) in LINKAGE_FAMILIES.items()}
        self.carry = {field: Counter(name, text, registry=r)
                      for field, (name, text) in CARRY_FAMILIES.items()}
        self.version: str | None = None

    def loaded(self, version: str) -> None:
        """The process now serves policy ``version`` (at start and after a reload)."""
        old, self.version = self.version, version
        if old is not None and old != version:
            self.policy_info.get(old).set(0)   # multiprocess files keep it: 0, not stale 1
            self.policy_info.children.pop((old,), None)
            self.policy_info.metric.remove(old)
        self.policy_info.get(version).set(1)
        self.policy_loaded.set(time.time())

    def reloaded(self, ok: bool, version: str = "") -> None:
        """A reload was tried: counted by result; a success with a ``version`` also
        calls ``loaded(version)``."""
        self.reloads.get("success" if ok else "failure").inc()
        if ok and version:
            self.loaded(version)
