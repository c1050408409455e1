"""Account linkage under attack: a hydra operator who knows the source.

Each test is one attack that works today (the test fails) and states the behaviour
that would stop it. Engine-level tests drive the same functions the proxy calls
(``evidence.observe`` -> ``LinkGraph.record``; ``PairFinder.add``), at the proxy's
default bounds.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from guardproxy import GuardMiddleware
from guardproxy.cli import main
from guardproxy.linkage.evidence import observe
from guardproxy.linkage.graph import MAX_VALUES, LinkGraph
from guardproxy.linkage.settings import LinkageSettings, SignalSpec
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.model import Account
from tests.conftest import sha
from tests.test_budget import usage_app

SECRET = "attack-test-secret-0123456789"
T0 = 1_764_460_800.0   # 2025-11-30T00:00:00Z
CHAT = "/v1/chat/completions"
EDGE = "10.0.0.5"      # the trusted edge (TLS terminator) in front of the proxy


def policy(tmp: Path, signals: str, rules: str,
           accounts: dict[str, dict[str, str]]) -> Path:
    """A policy behind a trusted edge (10.0.0.0/8), memory state, one key per account
    (``key-<id>``), each account its own org."""
    lines = ["accounts:"]
    for account, attributes in accounts.items():
        lines += [f"  - id: {account}", f"    org: org-{account}", "    tier: free",
                  f"    key_sha256: {sha('key-' + account)}",
                  "    attributes: " + json.dumps(attributes)]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    path = tmp / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "upstream: {url: 'http://127.0.0.1:9', dialect: openai}\n"
        "state: 'memory://'\n"
        "accounts: {keys: accounts.yaml}\n"
        "clients: {trusted_proxies: [10.0.0.0/8]}\n"
        f"linkage:\n  secret: {SECRET}\n  window: 30d\n  signals:\n{signals}"
        f"rules:\n{rules}")
    return path


def client(app: Any, peer: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 4000)),
                             base_url="http://p")


def chat(account: str, headers: dict[str, str] | None = None,
         max_tokens: int = 50) -> dict[str, Any]:
    return {"json": {"model": "m", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": "hi"}]},
            "headers": {"authorization": f"Bearer key-{account}", **(headers or {})}}


def account(name: str, **attributes: str) -> Account:
    return Account(id=name, org=name, tier="free", attributes=tuple(attributes.items()))


# -- (b) poisoning: innocent accounts linked and denied ------------------------------------
async def test_spoofed_edge_header_from_untrusted_peer_gets_innocent_denied(
        tmp_path: Path) -> None:
    # attack: copy the victim's edge-set TLS fingerprint (x-ja4) from a direct, untrusted
    # connection in the victim's /24, get linked to the victim, get yourself blocked:
    # the victim is now denied by `linked_to: blocked`.
    path = policy(tmp_path, """\
    - {ip: /24, weight: 0.5, max_fanout: 20}
    - {header: x-ja4, weight: 0.5, max_fanout: 50}
""", "  - {name: linked-to-blocked, linkage: {linked_to: blocked}}\n",
        {"victim": {}, "mallory": {}})
    app = GuardMiddleware(usage_app, path)
    ja4 = {"x-ja4": "t13d1516h2_8daaf6152771_e5627efa2ab1"}
    async with client(app, EDGE) as edge, client(app, "203.0.113.99") as direct:
        via_edge = {**ja4, "x-forwarded-for": "203.0.113.7"}
        assert (await edge.post(CHAT, **chat("victim", via_edge))).status_code == 200
        assert (await direct.post(CHAT, **chat("mallory", ja4))).status_code == 200
        assert app.linkage is not None
        await app.linkage.store.block("mallory")
        after = await edge.post(CHAT, **chat("victim", via_edge))
    assert after.status_code == 200, after.text   # today: 403 linked_to_blocked
    assert await app.linkage.store.members("victim") == ["victim"], \
        "a header the edge sets was believed from a peer that is not a trusted proxy"


def test_value_flood_evicts_a_hydras_evidence_at_default_bounds() -> None:
    # attack: between two hydra accounts' requests, one throwaway account sends
    # MAX_VALUES/2 requests with a fresh x-device-id and x-ja4 each (requests denied by
    # quota are recorded too): the hydra's shared card is evicted and they never link.
    settings = LinkageSettings(secret=SECRET, signals=(
        SignalSpec(id="attribute:payment", kind="attribute", weight=1.0, max_fanout=5,
                   name="payment"),
        SignalSpec(id="header:x-device-id", kind="header", weight=0.6, max_fanout=5,
                   name="x-device-id"),
        SignalSpec(id="header:x-ja4", kind="header", weight=0.3, max_fanout=50,
                   name="x-ja4")))
    graph = LinkGraph(settings)   # the bounds MemoryLinkageStore gives the proxy
    one, two = account("hydra-1", payment="card-X"), account("hydra-2", payment="card-X")
    flooder = account("flooder", payment="card-F")
    graph.record(one.id, observe(settings, one, "", {}), T0)
    for i in range(MAX_VALUES // 2 + 1):
        graph.record(flooder.id, observe(settings, flooder, "", {
            "x-device-id": f"d{i}", "x-ja4": f"j{i}"}), T0 + 1)
    cluster = graph.record(two.id, observe(settings, two, "", {}), T0 + 2)
    assert cluster.size == 2, "one account's junk values pushed a shared card out"


def test_prompt_flood_evicts_every_accounts_prompt_evidence() -> None:
    # attack: one account sends max_prompts (10,000) junk prompts; every other
    # account's stored prompts are evicted, so near-duplicate hydra prompts never meet.
    settings = LinkageSettings(secret=SECRET, signals=(
        SignalSpec(id="prompt_similarity", kind="prompt_similarity", weight=1.0,
                   similarity=0.8, min_pairs=1),))
    finder = PairFinder(settings)   # the proxy's default bounds
    prompt = ("please summarise the attached quarterly report on widget sales in five "
              "short bullet points for the board")
    assert finder.add("hydra-1", prompt, T0) == []
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(5000)]
    for _ in range(10_000):
        finder.add("flooder", " ".join(rng.choices(words, k=12)), T0 + 1)
    found = finder.add("hydra-2", prompt + " thanks", T0 + 2)
    assert [(p.a, p.b) for p in found] == [("hydra-1", "hydra-2")], \
        "one account's junk prompts evicted everybody else's"


# -- (a) avoiding links cheaply --------------------------------------------------------------
def _email_digest(address: str) -> str:
    settings = LinkageSettings(secret=SECRET, signals=(
        SignalSpec(id="attribute:email", kind="attribute", weight=1.0, name="email"),))
    [evidence] = [e for e in observe(settings, account("x", email=address), "", {})
                  if e.signal == "attribute:email"]
    return evidence.digest


def test_googlemail_alias_escapes_the_email_link() -> None:
    # attack: register the same Gmail mailbox as jdoe@gmail.com and jdoe@googlemail.com
    # (one inbox: the issue names both domains) to get two unlinked accounts.
    assert _email_digest("jdoe@googlemail.com") == _email_digest("jdoe@gmail.com")


def test_trailing_dot_domain_escapes_the_email_link() -> None:
    # attack: "jdoe@gmail.com." is the same mailbox (a fully qualified domain) but a
    # different canonical e-mail, so it links to nothing.
    assert _email_digest("j.doe@gmail.com.") == _email_digest("jdoe@gmail.com")


# -- (c) learning that you are linked ------------------------------------------------------
async def test_cluster_budget_headers_reveal_who_is_linked(tmp_path: Path) -> None:
    # attack: with `per: cluster`, x-ratelimit-remaining-tokens on a fresh account's first
    # response is the cluster's; lower than a stranger's means "you are linked", and
    # probing pairs one by one tells a hydra which accounts were caught.
    path = policy(tmp_path, "    - {attribute: payment, weight: 1.0, max_fanout: 5}\n",
                  "  - {name: hydra-tokens, budget: 100000/day, per: cluster}\n",
                  {"h1": {"payment": "card-1"}, "h2": {"payment": "card-1"},
                   "stranger": {"payment": "card-2"}})
    app = GuardMiddleware(usage_app, path)
    async with client(app, EDGE) as c:
        for _ in range(3):
            assert (await c.post(CHAT, **chat("h1"))).status_code == 200
        linked = await c.post(CHAT, **chat("h2"))
        alone = await c.post(CHAT, **chat("stranger"))
    assert (linked.status_code, alone.status_code) == (200, 200)
    name = "x-ratelimit-remaining-tokens"
    assert linked.headers.get(name) == alone.headers.get(name), \
        "the budget headers tell an account that its cluster spent before it"


# -- robustness of ingest ---------------------------------------------------------------
def test_one_far_future_record_silently_erases_the_ingested_graph(tmp_path: Path) -> None:
    # attack (or a corrupt log): one line with "time": 1e308 is accepted, the final
    # rebuild runs as of that time and every real link expires; nothing is reported.
    path = policy(tmp_path, "    - {ip: exact, weight: 1.0, max_fanout: 20}\n",
                  "  - {name: hydra-size, linkage: {max_accounts: 5}}\n", {})
    log = tmp_path / "log.jsonl"
    records = [{"time": T0, "account": "a1", "ip": "198.51.100.7"},
               {"time": T0 + 60, "account": "a2", "ip": "198.51.100.7"},
               {"time": 1e308, "account": "zz", "ip": "192.0.2.1"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["ingest", "--policy", str(path), str(log),
                                       "--export", str(out)])
    assert result.exit_code == 0, result.output
    clusters = json.loads(out.read_text())["clusters"]
    assert [c["accounts"] for c in clusters] == [["a1", "a2"]], result.output
