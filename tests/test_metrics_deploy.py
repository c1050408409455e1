"""deploy/: the Grafana dashboard and the Prometheus alert rules load, and every metric
and label their queries name is one guardproxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guardproxy.metrics.families import Family, Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAME = re.compile(r"\bguardproxy_[a-z_]+\b")
MATCHERS = re.compile(r"\b(guardproxy_[a-z_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job"}   # added by Prometheus when it scrapes


def exported() -> dict[str, set[str]]:
    """Every sample name guardproxy can export -> its label names."""
    metrics = Metrics(CollectorRegistry())
    found: list[Any] = []
    for attr in vars(metrics).values():
        if isinstance(attr, Family):
            found.append(attr.metric)
        elif isinstance(attr, Counter | Gauge | Histogram):
            found.append(attr)
        elif isinstance(attr, dict):
            found += [m for m in attr.values() if isinstance(m, Counter)]
    out: dict[str, set[str]] = {}
    for m in found:
        labels = set(m._labelnames)
        if m._type == "counter":
            out[m._name + "_total"] = labels
        elif m._type == "histogram":
            out[m._name + "_bucket"] = labels | {"le"}
            out[m._name + "_count"] = out[m._name + "_sum"] = labels
        else:
            out[m._name] = labels
    return out


def dashboard_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yaml").read_text())
    found = [r for g in rules["groups"] for r in g["rules"]]
    assert all(r["alert"] and r["expr"] for r in found)
    return [str(r["expr"]) for r in found]


def check(expr: str, known: dict[str, set[str]]) -> None:
    names = NAME.findall(expr)
    assert names, f"no guardproxy metric in {expr!r}"
    for name in names:
        assert name in known, f"{name} is not exported ({expr!r})"
    for name, inside in MATCHERS.findall(expr):
        for label in MATCHER_LABEL.findall(inside):
            assert label in known[name], f"{name} has no label {label!r}"
    allowed = set().union(*(known[n] for n in names)) | TARGET_LABELS
    for group in GROUPING.findall(expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in allowed, f"grouping by {label!r}, which {names} lack"
    assert expr.count("(") == expr.count(")"), expr


def test_dashboard_queries_name_only_exported_metrics_and_labels() -> None:
    known = exported()
    exprs = dashboard_exprs()
    for expr in exprs:
        check(expr, known)
    used = {n for e in exprs for n in NAME.findall(e)}
    # what the dashboard is for: each of these is graphed
    for needed in ("guardproxy_requests_total", "guardproxy_decisions_total",
                   "guardproxy_tokens_settled_total", "guardproxy_upstream_seconds_bucket",
                   "guardproxy_ttfb_seconds_bucket", "guardproxy_store_errors_total",
                   "guardproxy_audit_dropped_total", "guardproxy_linkage_requests_total",
                   "guardproxy_reloads_total", "guardproxy_policy_info"):
        assert needed in used, needed
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_name_only_exported_metrics_and_labels() -> None:
    known = exported()
    for expr in alert_exprs():
        check(expr, known)


def test_the_checker_catches_a_misspelt_metric_or_label() -> None:
    known = exported()
    for bad in ("rate(guardproxy_request_total[5m])",
                'rate(guardproxy_requests_total{code="200"}[5m])',
                "sum by (account) (rate(guardproxy_requests_total[5m]))"):
        try:
            check(bad, known)
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {bad}")
