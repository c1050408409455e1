"""Co-held hot values (``linkage.cohort``): a crowd on several independent values at
once is one actor; strangers on one crowded value, or on correlated ones, are not."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from guardproxy.errors import PolicyError
from guardproxy.linkage.api import Evidence
from guardproxy.linkage.cohort import CoHeld
from guardproxy.linkage.graph import LinkGraph
from guardproxy.linkage.settings import LinkageSettings
from guardproxy.policy.load import load_policy
from tests.conftest import write_policy
from tests.test_linkage_engine import ISSUE_SIGNALS, make_settings, spec

T0 = 1_764_460_800.0


def run(settings: LinkageSettings,
        requests: Iterable[tuple[str, list[Evidence]]]) -> LinkGraph:
    """Each request recorded with what the cohort makes of it (as the enricher)."""
    graph, cohort = LinkGraph(settings), CoHeld(settings)
    for i, (account, evidence) in enumerate(requests):
        now = T0 + i
        pairs = cohort.add(account, evidence, now)
        graph.record(account, evidence, now)
        graph.record_pairs(pairs, now)
    return graph


def hydra(n: int, *values: tuple[str, str], prefix: str = "h") -> list[tuple[str, list[Evidence]]]:
    return [(f"{prefix}{i:03d}", [Evidence(s, d) for s, d in values]) for i in range(n)]


SETTINGS = make_settings(window=10_000.0)


@pytest.mark.parametrize("size", [7, 30, 150])
def test_a_naive_hydra_is_one_cluster_though_each_of_its_values_is_hot(size: int) -> None:
    # one card, one device, one data-centre address: all three hot beyond 5 / 5 / 20
    graph = run(SETTINGS, hydra(size, ("attribute:payment", "c1"),
                                ("header:x-device-id", "d1"), ("ip:exact", "ip1"),
                                ("ip:/24", "net1")))
    assert {h.signal for h in graph.hot_values()} >= {"attribute:payment", "header:x-device-id"}
    assert graph.cluster("h000").size == size
    assert len(graph.graph().clusters) == 1
    # the last to join was linked by the co-held card
    last = f"h{size - 1:03d}"
    assert any("attribute:payment" in {e.signal for e in link.evidence}
               for link in graph.links("h000") if last in (link.a, link.b))


def test_without_the_cohort_rule_the_same_hydra_is_not_linked() -> None:
    # the rule is what links it (this test fails if the cohort finder is bypassed)
    graph = LinkGraph(SETTINGS)
    for i, (account, evidence) in enumerate(hydra(30, ("attribute:payment", "c1"),
                                                  ("header:x-device-id", "d1"),
                                                  ("ip:exact", "ip1"))):
        graph.record(account, evidence, T0 + i)
    # the first five shared the card before it turned hot; the rest are alone
    assert graph.cluster("h029").size == 1


def test_strangers_behind_one_crowded_address_are_not_linked() -> None:
    # a carrier NAT: one address (hot) and its range, own cards and devices
    requests = [(f"s{i:03d}", [Evidence("ip:exact", "nat"), Evidence("ip:/24", "natnet"),
                               Evidence("attribute:payment", f"card{i}"),
                               Evidence("header:x-device-id", f"dev{i}")])
                for i in range(60)]
    graph = run(SETTINGS, requests)
    assert graph.graph().clusters == ()


def test_correlated_client_headers_never_corroborate_each_other() -> None:
    # a popular client: its User-Agent and its JA4 are held by the same crowd; even
    # weighted to reach the threshold together, one family counts once
    # (fan-out 1: hot from the second holder on, so no pair ever shared them while cold)
    settings = make_settings((spec("header:user-agent", 0.6, 1), spec("header:x-ja4", 0.6, 1),
                              spec("ip:exact", 0.5, 20)), window=10_000.0)
    requests = [(f"u{i:03d}", [Evidence("header:user-agent", "sdk"),
                               Evidence("header:x-ja4", "sdk-tls"),
                               Evidence("ip:exact", f"home{i}")]) for i in range(80)]
    assert run(settings, requests).graph().clusters == ()
    assert settings.signal("header:x-ja4").family == "client"   # type: ignore[union-attr]


def test_co_held_values_must_reach_the_threshold_on_their_own() -> None:
    # an address (0.5) and a JA4 (0.3) held by the same crowd: 0.8 < 1.0, nothing added
    settings = make_settings((spec("ip:exact", 0.5, 5), spec("header:x-ja4", 0.3, 5)),
                             window=10_000.0)
    graph = run(settings, hydra(20, ("ip:exact", "a"), ("header:x-ja4", "j")))
    assert graph.graph().clusters == ()
    # ... and 0.5 + 0.6 does
    settings = make_settings((spec("ip:exact", 0.5, 5), spec("header:x-device-id", 0.6, 5)),
                             window=10_000.0)
    graph = run(settings, hydra(20, ("ip:exact", "a"), ("header:x-device-id", "d")))
    assert graph.cluster("h000").size == 20


def test_two_crowds_that_only_partly_overlap_are_not_one() -> None:
    # a hot card held by 30 accounts, a hot device held by 30 others and 6 of them:
    # Jaccard 6/54, far below a half
    requests = []
    for i in range(30):
        requests.append((f"a{i:02d}", [Evidence("attribute:payment", "c")]))
    for i in range(24):
        requests.append((f"b{i:02d}", [Evidence("header:x-device-id", "d")]))
    for i in range(6):
        requests.append((f"a{i:02d}", [Evidence("attribute:payment", "c"),
                                       Evidence("header:x-device-id", "d")]))
    # (the first five holders shared the card before it turned hot: linked by it)
    graph = run(SETTINGS, requests)
    assert all(not any(a.startswith("b") for a in accounts)
               for _, accounts, _ in graph.graph().clusters)


def test_an_account_new_to_the_crowd_links_at_its_first_request() -> None:
    finder = CoHeld(SETTINGS)
    values = [Evidence("attribute:payment", "c"), Evidence("header:x-device-id", "d")]
    out = []
    for i in range(8):
        out = finder.add(f"h{i}", values, T0 + i)
    assert {(p.a, p.b) for p in out} >= {(f"h{i}", "h7") for i in range(7)}
    assert finder.add("h7", values, T0 + 9) == []   # nothing new: nothing re-sent


def test_sightings_older_than_the_window_leave_the_crowd() -> None:
    settings = make_settings(window=100.0)
    finder = CoHeld(settings)
    values = [Evidence("attribute:payment", "c"), Evidence("header:x-device-id", "d")]
    for i in range(5):
        finder.add(f"old{i}", values, T0 + i)
    # long after: five new holders, never more than the fan-out live at once
    assert all(finder.add(f"new{i}", values, T0 + 1000 + i) == [] for i in range(5))


def test_family_is_a_policy_key(tmp_path: Path) -> None:
    text = """
linkage:
  secret: 0123456789abcdef-x
  signals:
    - {header: x-device-id, weight: 0.6, family: device}
    - {header: x-install-id, weight: 0.6, family: device}
rules:
  - {name: q, quota: 10/minute}
"""
    policy = load_policy(write_policy(tmp_path, text), {})
    assert policy.linkage is not None
    assert {s.family for s in policy.linkage.signals} == {"device"}
    assert all(s.family for s in ISSUE_SIGNALS)
    with pytest.raises(PolicyError) as info:
        load_policy(write_policy(tmp_path, text.replace("family: device}", "famly: device}", 1)),
                    {})
    assert "famly" in str(info.value.problems[0])
