"""Linkage under floods and spoofing: one account's junk cannot push out others'
evidence, and a header only the edge can set is believed only from the edge."""

from __future__ import annotations

from pathlib import Path

from guardproxy.linkage.api import Evidence
from guardproxy.linkage.evidence import observe
from guardproxy.linkage.graph import LinkGraph
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Account
from tests.conftest import write_policy
from tests.test_linkage_engine import make_settings, spec

T0 = 1_764_460_800.0


def test_an_account_shows_at_most_its_cap_of_new_values_per_signal() -> None:
    settings = make_settings((spec("header:x-device-id", 0.6, 5), spec("ip:exact", 0.5, 20)),
                             window=100.0)
    graph = LinkGraph(settings)
    cap = settings.max_values_per_account
    for i in range(cap + 10):
        graph.record("sprayer", [Evidence("header:x-device-id", f"d{i}")], T0 + i * 0.01)
    assert graph.stats()["values"] == cap and graph.shown.sprays == 10
    # values it already holds still count; other signals have their own cap
    for other in ("b", "c"):
        graph.record(other, [Evidence("header:x-device-id", "d0"), Evidence("ip:exact", "x")],
                     T0 + 1)
    assert graph.members("b") == ["b", "c"]    # 0.6 + 0.5; the sprayer shares 0.6 only
    graph.record("sprayer", [Evidence("ip:exact", "x")], T0 + 1)
    assert graph.members("b") == ["b", "c", "sprayer"]   # its d0 was recorded in time
    # once the window has passed, it may show new values again
    graph.record("sprayer", [Evidence("header:x-device-id", "late")], T0 + 200)
    assert ("header:x-device-id", "late") in graph.values


def test_junk_values_are_evicted_before_shared_evidence() -> None:
    settings = make_settings((spec("attribute:payment", 1.0, 5),
                              spec("header:x-device-id", 0.6, 5)), window=10_000.0)
    graph = LinkGraph(settings, max_values=50)
    graph.record("h1", [Evidence("attribute:payment", "card")], T0)
    graph.record("h2", [Evidence("attribute:payment", "card")], T0 + 1)
    for i in range(40):   # many accounts, each a few junk values of its own
        for j in range(5):
            graph.record(f"junk{i}", [Evidence("header:x-device-id", f"{i}-{j}")], T0 + 2)
    assert ("attribute:payment", "card") in graph.values
    assert graph.record("h3", [Evidence("attribute:payment", "card")], T0 + 3).size == 3


def test_one_accounts_prompts_cannot_flush_the_others() -> None:
    settings = make_settings((spec("prompt_similarity", 1.0, similarity=0.8, min_pairs=1),))
    finder = PairFinder(settings, max_prompts=500)
    prompt = "please summarise the attached quarterly report on widget sales in five points"
    finder.add("a", prompt, T0)
    for i in range(2000):
        finder.add("flood", f"junk prompt number {i} " + "lorem ipsum dolor sit amet " * 2, T0)
    assert [(p.a, p.b) for p in finder.add("b", prompt + " thanks", T0 + 1)] == [("a", "b")]


def edge_policy(tmp_path: Path, line: str) -> str:
    return f"""
linkage:
  secret: 0123456789abcdef-x
  signals:
    - {line}
rules:
  - {{name: q, quota: 10/minute}}
"""


def test_tls_fingerprint_headers_are_edge_headers_by_default(tmp_path: Path) -> None:
    for line, edge in [("{header: x-ja4, weight: 0.3}", True),
                       ("{header: X-JA3-Hash, weight: 0.3}", True),
                       ("{header: x-ja4, weight: 0.3, edge: false}", False),
                       ("{header: x-device-id, weight: 0.6}", False),
                       ("{header: x-client-cert-sha, weight: 0.6, edge: true}", True)]:
        policy = load_policy(write_policy(tmp_path, edge_policy(tmp_path, line)), {})
        assert policy.linkage is not None
        (signal,) = policy.linkage.signals
        assert signal.edge is edge, line
        account = Account(id="a", org="a", tier="t")
        headers = {signal.name: "value"}
        assert len(observe(policy.linkage, account, "", headers, peer_trusted=False)) == \
            (0 if edge else 1) + 1, line   # + the org
        assert len(observe(policy.linkage, account, "", headers, peer_trusted=True)) == 2


def test_max_values_per_account_is_a_policy_key(tmp_path: Path) -> None:
    text = edge_policy(tmp_path, "{header: x-device-id, weight: 0.6}").replace(
        "  signals:", "  max_values_per_account: 8\n  signals:")
    policy = load_policy(write_policy(tmp_path, text), {})
    assert policy.linkage is not None and policy.linkage.max_values_per_account == 8


def test_a_sprayer_cannot_flush_the_cohorts_crowds() -> None:
    # the co-held judgement keeps its own bounded table of holders: one account cycling
    # junk device ids must not evict a hydra's card and device from it
    from guardproxy.linkage.cohort import CoHeld

    settings = make_settings((spec("attribute:payment", 1.0, 5),
                              spec("header:x-device-id", 0.6, 5)), window=10_000.0)
    cohort = CoHeld(settings, max_values=200)
    crowd = [Evidence("attribute:payment", "card"), Evidence("header:x-device-id", "dev")]
    for i in range(6):
        cohort.add(f"h{i}", crowd, T0 + i)
    for i in range(5000):
        cohort.add("sprayer", [Evidence("header:x-device-id", f"junk{i}")], T0 + 10)
    found = cohort.add("h6", crowd, T0 + 20)
    assert {(p.a, p.b) for p in found} >= {(f"h{i}", "h6") for i in range(6)}
