"""Prometheus metrics in one process: what the observer counts from real requests
through the middleware, the sources it publishes (audit, linkage), reload counters,
the /metrics app, and that no account, key or IP ever becomes a label."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from guardproxy import GuardMiddleware
from guardproxy.linkage.carry import CarryCounters
from guardproxy.linkage.enricher import LinkageCounters
from guardproxy.metrics import KEY, metrics_app, metrics_for, metrics_observer
from guardproxy.metrics.families import CARRY_FAMILIES, LINKAGE_FAMILIES, Metrics
from guardproxy.metrics.observer import MetricsObserver, Sources
from guardproxy.observe import Decision, RequestRecord
from guardproxy.policy.load import load_policy
from tests.test_budget import usage_app
from tests.test_linkage_enforce import linkage_policy
from tests.test_request_plan import Upstream, call, chat, json_headers, policy

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

RULES = """
rules:
  - name: requests
    quota: 2/minute
  - name: watch
    quota: 1/minute
    mode: shadow
  - name: tokens
    budget: 100000/day
    default_max_tokens: 100
"""


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


async def scrape(app: GuardMiddleware, accept: str = "") -> tuple[int, str, str]:
    """GET /metrics from ``metrics_app`` mounted for ``app``: (status, type, body)."""
    reply = await call(metrics_app(metrics_for(app.state)), "GET", "/metrics",
                       headers={"accept": accept} if accept else {})
    return reply.status, reply.header("content-type")[0], reply.body.decode()


def record(**fields_: Any) -> RequestRecord:
    base: dict[str, Any] = {"time": 0.0, "request_id": "r", "method": "POST",
                            "path": "/v1/chat/completions", "route": "chat",
                            "dialect": "openai", "status": 200, "ending": "completed"}
    return RequestRecord(**{**base, **fields_})


def observer() -> MetricsObserver:
    metrics = Metrics(CollectorRegistry())
    return MetricsObserver(metrics, Sources(metrics))


def exposed(obs: MetricsObserver) -> Samples:
    from prometheus_client import generate_latest

    obs.sources.sync()
    return samples(generate_latest(obs.metrics.registry).decode())


# -- through the middleware -------------------------------------------------------------
async def test_requests_decisions_tokens_and_latency_from_real_requests(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES))
    statuses = [(await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                            body=chat())).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, content_type, text = await scrape(app)
    assert status == 200 and content_type.startswith("text/plain")
    got = samples(text)
    req = "guardproxy_requests_total"
    assert value(got, req, status="200", dialect="openai", route="chat",
                 ending="completed") == 2
    assert value(got, req, status="429", dialect="openai", route="chat",
                 ending="denied") == 1
    dec = "guardproxy_decisions_total"
    assert value(got, dec, rule="requests", mode="enforce", outcome="allowed") == 2
    assert value(got, dec, rule="requests", mode="enforce", outcome="denied") == 1
    # the shadow rule denied the 2nd request and was never asked about the 3rd
    assert value(got, dec, rule="watch", mode="shadow", outcome="allowed") == 1
    assert value(got, dec, rule="watch", mode="shadow", outcome="denied") == 1
    assert value(got, dec, rule="tokens", mode="enforce", outcome="allowed") == 2
    # the upstream reports 10 prompt tokens + the 100-token cap: 110 each
    assert value(got, "guardproxy_tokens_settled_total", tier="free") == 220
    assert value(got, "guardproxy_tokens_reserved_total", tier="free") >= 220
    assert value(got, "guardproxy_budget_charged_tokens_total", rule="tokens") == 220
    for histogram in ("guardproxy_upstream_seconds", "guardproxy_ttfb_seconds"):
        assert value(got, histogram + "_count", dialect="openai", route="chat") == 2


async def test_no_account_key_or_ip_is_ever_a_label(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES))
    for key in ("key-alice", "key-bob", "key-carol", "key-nobody"):
        await call(app, "POST", "/v1/chat/completions", body=chat(),
                   headers=json_headers({"authorization": f"Bearer {key}"}),
                   client=("127.0.0.77", 4000))
    text = (await scrape(app))[2]
    for secret in ("alice", "bob", "carol", "acme", "key-", "127.0.0.77", '"m"'):
        assert secret not in text
    labels = {k for (name, pairs) in samples(text) for k, _ in pairs}
    assert labels <= {"status", "dialect", "route", "ending", "rule", "mode", "outcome",
                      "tier", "le", "result", "version", "linked"}


async def test_store_errors_are_counted_by_rule(tmp_path: Path) -> None:
    # nothing listens on port 1: every store call fails at once
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES, state="redis://127.0.0.1:1/0"))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat())
    assert reply.status == 503
    got = samples((await scrape(app))[2])
    assert value(got, "guardproxy_store_errors_total", rule="requests") == 1
    assert value(got, "guardproxy_requests_total", status="503", dialect="openai",
                 route="chat", ending="denied") == 1


async def test_a_reload_keeps_the_observer_and_its_totals(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES))
    await call(app, "POST", "/v1/chat/completions", headers=json_headers(), body=chat())
    kept = app.state.extras[KEY]
    app.swap(load_policy(policy(tmp_path, RULES.replace("2/minute", "5/minute"))))
    await call(app, "POST", "/v1/chat/completions", headers=json_headers(), body=chat())
    assert metrics_for(app.state) is kept
    assert kept in app.pipeline.observer.observers
    got = samples((await scrape(app))[2])
    assert value(got, "guardproxy_requests_total", status="200", dialect="openai",
                 route="chat", ending="completed") == 2


async def test_linkage_counters_and_linked_requests(tmp_path: Path) -> None:
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, """
rules:
  - name: hydra-size
    linkage: {max_accounts: 10}
"""))
    for key in ("key-alice", "key-carol", "key-dave"):
        reply = await call(app, "POST", "/v1/chat/completions", body=chat(max_tokens=5),
                           headers=json_headers({"authorization": f"Bearer {key}"}))
        assert reply.status == 200
    assert app.linkage is not None
    app.linkage.counters.dropped += 4   # as the enricher counts a full queue
    got = samples((await scrape(app))[2])
    assert value(got, "guardproxy_linkage_recorded_total") == 3
    assert value(got, "guardproxy_linkage_prompts_dropped_total") == 4
    # carol shares alice's card: counted under alice's cluster id
    assert value(got, "guardproxy_linkage_requests_total", linked="true") == 1
    assert value(got, "guardproxy_linkage_requests_total", linked="false") == 2


async def test_audit_lines_are_counted_once_across_reloads(tmp_path: Path) -> None:
    """Each ``_observers`` call makes a new trail object over one process counter:
    published once, not once per reload."""
    from guardproxy.audit.trail import audit_trails

    top = f"audit: {{path: '{tmp_path / 'audit.log'}'}}\n"
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES, top=top))
    for _ in range(2):
        await call(app, "POST", "/v1/chat/completions", headers=json_headers(), body=chat())
        app.swap(load_policy(policy(tmp_path, RULES, top=top)))
    await audit_trails(app.state).aclose()   # every line written
    got = samples((await scrape(app))[2])
    assert value(got, "guardproxy_audit_written_total") == 2
    assert value(got, "guardproxy_audit_dropped_total") == 0


def test_every_linkage_counter_is_published() -> None:
    """A field added to the counters must get a family (else it is silently unseen)."""
    assert {f.name for f in fields(LinkageCounters)} == set(LINKAGE_FAMILIES)
    assert {f.name for f in fields(CarryCounters)} == set(CARRY_FAMILIES)


# -- the observer alone -----------------------------------------------------------------
def test_canary_ledger_and_tierless_tokens_from_records() -> None:
    obs = observer()
    obs.completed(record(canary_key_id="k1", ledger_entry_id="e1", tokens_reserved=50,
                         tokens_settled=40,
                         decisions=(Decision("b", "enforce", True, "", 50, 40),)))
    obs.completed(record(canary_key_id="k1", status=0, ending="cancelled"))
    obs.settled(None, "b", 50, 40, None)  # type: ignore[arg-type]
    got = exposed(obs)
    assert value(got, "guardproxy_canary_marks_total") == 2
    assert value(got, "guardproxy_ledger_writes_total") == 1
    assert value(got, "guardproxy_tokens_reserved_total", tier="none") == 50
    assert value(got, "guardproxy_tokens_settled_total", tier="none") == 40
    assert value(got, "guardproxy_budget_reserved_tokens_total", rule="b") == 50
    assert value(got, "guardproxy_requests_total", status="0", dialect="openai",
                 route="chat", ending="cancelled") == 1
    # neither request reached upstream: no latency observed
    assert value(got, "guardproxy_upstream_seconds_count", dialect="openai",
                 route="chat") == 0


class Trail:
    def __init__(self, counters: Any = None) -> None:
        if counters is not None:
            self.counters = counters
        else:
            self.dropped = 0


class Counts:
    def __init__(self) -> None:
        self.dropped = 0
        self.written = 0


def test_audit_counts_are_published_once_per_counter_object_and_never_go_down() -> None:
    obs = observer()
    shared = Counts()
    first, second = Trail(shared), Trail(shared)   # a reload: a new trail, same counters
    for trail in (first, second, first):
        obs.sources.watch_trail(trail)
    shared.dropped, shared.written = 3, 10
    got = exposed(obs)
    assert value(got, "guardproxy_audit_dropped_total") == 3
    assert value(got, "guardproxy_audit_written_total") == 10
    alone = Trail()   # a trail that counts on itself
    obs.sources.watch_trail(alone)
    alone.dropped = 2
    shared.dropped = 4
    assert value(exposed(obs), "guardproxy_audit_dropped_total") == 6
    assert value(exposed(obs), "guardproxy_audit_dropped_total") == 6   # no re-adding


def test_workers_publish_their_sources_from_requests_at_most_once_a_second() -> None:
    """In multiprocess mode the scrape reaches one worker: the others publish their
    audit and linkage counters from ``completed`` (throttled)."""
    obs = observer()
    obs.metrics.multiprocess = True
    counts = Counts()
    obs.sources.watch_trail(Trail(counts))
    registry = obs.metrics.registry

    def dropped() -> float | None:
        return registry.get_sample_value("guardproxy_audit_dropped_total")

    counts.dropped = 3
    obs.completed(record())             # synced just now (at creation): not yet
    assert dropped() == 0
    obs.sources.synced -= 1.0           # a second later
    obs.completed(record())
    assert dropped() == 3
    obs.metrics.multiprocess = False    # one process: only scrapes sync
    counts.dropped = 5
    obs.sources.synced -= 1.0
    obs.completed(record())
    assert dropped() == 3


def test_reloads_and_the_policy_version() -> None:
    obs = observer()
    m = obs.metrics
    m.loaded("aaaa")
    m.reloaded(False, "bbbb")
    got = exposed(obs)
    assert value(got, "guardproxy_reloads_total", result="failure") == 1
    assert value(got, "guardproxy_policy_info", version="aaaa") == 1
    assert ("guardproxy_policy_info", frozenset({("version", "bbbb")})) not in got
    m.reloaded(True, "cccc")
    got = exposed(obs)
    assert value(got, "guardproxy_reloads_total", result="success") == 1
    assert value(got, "guardproxy_policy_info", version="cccc") == 1
    assert ("guardproxy_policy_info", frozenset({("version", "aaaa")})) not in got
    assert value(got, "guardproxy_policy_loaded_timestamp_seconds") > 0


# -- the /metrics app -------------------------------------------------------------------
async def test_metrics_app_methods_and_openmetrics(tmp_path: Path) -> None:
    app = GuardMiddleware(Upstream(), policy(tmp_path, RULES))
    served = metrics_app(metrics_observer(app.pipeline.policy, app.state))
    assert (await call(served, "POST", "/metrics")).status == 405
    head = await call(served, "HEAD", "/metrics")
    assert head.status == 200 and head.body == b""
    assert int(head.header("content-length")[0]) > 0
    status, content_type, text = await scrape(app, "application/openmetrics-text")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
