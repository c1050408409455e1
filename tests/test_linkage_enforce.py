"""Account linkage enforced: ``per: cluster`` budgets, ``linkage:`` rules, the enricher's
background queue, the admin endpoints, store failures, reloads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy import GuardMiddleware
from guardproxy.app import create_app
from guardproxy.errors import PolicyError
from guardproxy.exchange import Exchange
from guardproxy.fake_model import create_fake_app
from guardproxy.guards.base import Outcome
from guardproxy.linkage.enricher import LinkageEnricher, prompt_text
from guardproxy.linkage.memory import MemoryLinkageStore
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Account
from guardproxy.response.events import Ending
from tests.conftest import sha, write_policy
from tests.servers import running_server
from tests.test_budget import usage_app

SECRET = "linkage-test-secret-0123456789"
LINKAGE = f"""
linkage:
  secret: {SECRET}
  window: 30d
  signals:
    - {{attribute: payment, weight: 1.0, max_fanout: 5}}
"""
# alice, carol and frank pay with one card: one actor. dave and erin are on their own.
PEOPLE = {"key-alice": ("alice", "card-1"), "key-carol": ("carol", "card-1"),
          "key-frank": ("frank", "card-1"), "key-dave": ("dave", "card-2"),
          "key-erin": ("erin", "card-3")}
LINKED = ("alice", "carol", "frank")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


def linkage_policy(tmp: Path, rules: str, *, linkage: str = LINKAGE, **options: Any) -> Path:
    """A policy with ``linkage`` and ``rules``; every account is its own org, with a card."""
    policy = write_policy(tmp, linkage + rules, **options)
    lines = ["accounts:"]
    for key, (account, card) in PEOPLE.items():
        lines += [f"  - id: {account}", f"    org: org-{account}", f"    key_sha256: {sha(key)}",
                  f"    attributes: {{payment: {card}}}"]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    return policy


def chat(key: str, text: str = "hi", max_tokens: int = 5) -> dict[str, Any]:
    return {"json": {"model": "m", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": text}]},
            "headers": {"authorization": f"Bearer {key}"}}


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p")


def no_member_named(body: str, caller: str) -> None:
    for other in LINKED:
        if other != caller:
            assert other not in body, f"the error names {other!r}: {body}"
    assert "card-" not in body


# -- per: cluster -------------------------------------------------------------------
def test_linked_accounts_share_one_cluster_budget(tmp_path: Path, fake: str) -> None:
    rules = """
rules:
  - name: tokens
    budget: 300/day
    per: cluster
"""
    with running_server(create_app(linkage_policy(tmp_path, rules, upstream=fake))) as url:
        def spend(keys: list[str]) -> list[int]:
            codes: list[int] = []
            for i in range(200):
                r = httpx.post(url + CHAT, timeout=10, **chat(keys[i % len(keys)]))
                codes.append(r.status_code)
                if r.status_code == 429:
                    no_member_named(r.text, PEOPLE[keys[i % len(keys)]][0])
                    return codes
            raise AssertionError("the budget never ran out")

        alone = spend(["key-dave"])
        together = spend(["key-alice", "key-carol", "key-frank"])
        after = [httpx.post(url + CHAT, timeout=10, **chat(key)).status_code
                 for key in ("key-alice", "key-carol", "key-frank", "key-erin")]
    # three linked accounts take what one account takes, not three times as much
    assert together.count(200) == alone.count(200) >= 3
    assert after == [429, 429, 429, 200]


def test_per_cluster_without_linkage_is_a_policy_error(tmp_path: Path) -> None:
    """Without ``linkage:`` every cluster would be one account: refused, not guessed."""
    with pytest.raises(PolicyError, match="linkage"):
        load_policy(write_policy(tmp_path, """
rules:
  - name: tokens
    budget: 1000/day
    per: cluster
    default_max_tokens: 100
"""))


# -- linkage: rules -------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_max_accounts_denies_big_clusters_in_the_dialects_json(
        tmp_path: Path, dialect: str) -> None:
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, """
rules:
  - name: hydra-size
    linkage: {max_accounts: 2}
""", dialect=dialect))
    path = CHAT if dialect == "openai" else "/v1/messages"

    def ask(key: str) -> dict[str, Any]:
        request = chat(key)
        if dialect == "anthropic":
            request["headers"] = {"x-api-key": key}
        return request

    async with client(app) as c:
        first = [(await c.post(path, **ask(k))).status_code for k in ("key-alice", "key-carol")]
        third = await c.post(path, **ask("key-frank"))
        again = await c.post(path, **ask("key-alice"))
        dave = await c.post(path, **ask("key-dave"))
    assert first == [200, 200], "a cluster of two is allowed"
    assert (third.status_code, again.status_code, dave.status_code) == (403, 403, 200)
    error = third.json()
    if dialect == "openai":
        assert error["error"]["type"] == "permission_error"
        assert error["error"]["code"] == "linked_accounts"
    else:
        assert error == {"type": "error", "error": {
            "type": "permission_error", "message": error["error"]["message"]}}
    assert "hydra-size" in third.text
    no_member_named(third.text, "frank")
    no_member_named(again.text, "alice")


async def test_linked_to_blocked_denies_the_linked_not_strangers(tmp_path: Path,
                                                               fake: str) -> None:
    policy = linkage_policy(tmp_path, """
admin: {token: s3cret}
rules:
  - name: linked-to-blocked
    linkage: {linked_to: blocked}
""", upstream=fake)
    app = create_app(policy)
    admin = {"authorization": "Bearer s3cret"}
    async with client(app) as c:
        for key in ("key-alice", "key-carol", "key-dave"):
            assert (await c.post(CHAT, **chat(key))).status_code == 200
        blocked = await c.post("/admin/linkage/alice/block", headers=admin)
        carol = await c.post(CHAT, **chat("key-carol"))
        frank = await c.post(CHAT, **chat("key-frank"))   # links on this very request
        dave = await c.post(CHAT, **chat("key-dave"))
        unblocked = await c.post("/admin/linkage/alice/unblock", headers=admin)
        carol_again = await c.post(CHAT, **chat("key-carol"))
    assert blocked.status_code == 200 and blocked.json()["blocked"] is True
    assert (carol.status_code, frank.status_code, dave.status_code) == (403, 403, 200)
    assert carol.json()["error"]["type"] == "permission_error"
    assert carol.json()["error"]["code"] == "linked_to_blocked"
    no_member_named(carol.text, "carol")
    no_member_named(frank.text, "frank")
    assert unblocked.json()["blocked"] is False
    assert carol_again.status_code == 200


class Recorder:
    """An observer that keeps every decision."""

    def __init__(self) -> None:
        self.decisions: list[Outcome] = []
        self.errors: list[str] = []

    def decision(self, exchange: Exchange, outcome: Outcome) -> None:
        self.decisions.append(outcome)

    def settled(self, exchange: Exchange, rule: str, reserved: int, charged: int,
                ending: Ending) -> None:
        return None

    def store_error(self, exchange: Exchange | None, rule: str, error: Exception) -> None:
        self.errors.append(rule)


async def test_shadow_mode_counts_and_lets_through(tmp_path: Path) -> None:
    recorder = Recorder()
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, """
rules:
  - name: hydra-size
    linkage: {max_accounts: 1}
    mode: shadow
"""), observer=recorder)
    async with client(app) as c:
        codes = [(await c.post(CHAT, **chat(k))).status_code
                 for k in ("key-alice", "key-carol", "key-dave", "key-frank")]
    assert codes == [200] * 4
    # alice alone: fine; carol links (2 > 1), dave alone: fine; frank makes three
    assert [(o.rule, o.shadow, o.status, o.allowed) for o in recorder.decisions] == \
        [("hydra-size", True, 403, False)] * 2


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200)])
async def test_a_failing_store_follows_on_store_error(tmp_path: Path, on_error: str,
                                                     status: int) -> None:
    recorder = Recorder()
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, f"""
rules:
  - name: hydra-size
    linkage: {{max_accounts: 3}}
    on_store_error: {on_error}
""", state="redis://127.0.0.1:1/0"), observer=recorder)
    async with client(app) as c:
        r = await c.post(CHAT, **chat("key-alice"))
    await app.state.aclose()
    assert r.status_code == status
    assert recorder.errors == ["hydra-size"]
    assert app.linkage is not None and app.linkage.counters.store_errors == 1


# -- the enricher ------------------------------------------------------------------------
async def test_a_full_queue_drops_counts_and_warns_once(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    settings = load_policy(linkage_policy(tmp_path, "rules: []\n")).linkage
    assert settings is not None
    enricher = LinkageEnricher(settings, MemoryLinkageStore(settings), PairFinder(settings),
                               queue_size=2)
    account = Account("alice", "org-alice", "free", (("payment", "card-1"),))
    caplog.set_level(logging.WARNING, "guardproxy.linkage")
    for _ in range(5):   # no await that yields: the background task cannot drain between
        exchange = Exchange("POST", CHAT, {}, "203.0.113.9", account=account,
                            json={"messages": [{"role": "user", "content": "hello"}]})
        await enricher.enrich(exchange)
        assert exchange.notes["cluster"].id == "alice"
    assert (enricher.counters.queued, enricher.counters.dropped) == (2, 3)
    assert [r.message for r in caplog.records].count(
        "linkage queue full (2): prompt evidence is being dropped "
        "(counted in linkage dropped)") == 1
    await enricher.drained()
    assert enricher.queue.empty()
    await enricher.aclose()
    assert not enricher.running


async def test_near_duplicate_prompts_link_off_the_request_path(tmp_path: Path) -> None:
    linkage = LINKAGE.rstrip() + "\n    - {prompt_similarity: 0.8, weight: 1.0, min_pairs: 2}\n"
    app = GuardMiddleware(usage_app, linkage_policy(tmp_path, """
rules:
  - name: tokens
    budget: 100000/day
    per: cluster
""", linkage=linkage))
    prompts = ["Translate the attached quarterly report into formal German and keep every "
               "table, figure and footnote exactly where it is",
               "Summarise this customer support transcript in five short bullet points and "
               "list every promise the agent made"]
    async with client(app) as c:
        for text in prompts:
            for key in ("key-dave", "key-erin"):
                assert (await c.post(CHAT, **chat(key, text))).status_code == 200
        assert app.linkage is not None
        await app.linkage.drained()
        store = app.linkage.store
        assert (await store.cluster("erin")).id == "dave"
        (link,) = await store.links("erin")
        assert [e.signal for e in link.evidence] == ["prompt_similarity"]
        await app.linkage.aclose()


def test_prompt_text_reads_every_dialects_last_user_message() -> None:
    assert prompt_text({"messages": [{"role": "user", "content": "first"},
                                     {"role": "assistant", "content": "answer"},
                                     {"role": "user", "content": [
                                         {"type": "text", "text": "second"},
                                         {"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "part"}]}]}) == "second\npart"
    assert prompt_text({"system": "s", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "claude"}]}]}) == "claude"
    assert prompt_text({"input": "responses"}) == "responses"
    assert prompt_text({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "typed"}]}]}) == "typed"
    assert prompt_text({"prompt": ["a", "legacy"]}) == "legacy"
    assert prompt_text({"messages": [{"role": "assistant", "content": "x"}]}) is None
    assert prompt_text({"prompt": [1, 2, 3]}) is None
    assert prompt_text(None) is None
    assert len(prompt_text({"prompt": "w" * 100_000}) or "") == 4096


# -- admin, reloads, lifespan ------------------------------------------------------------
async def test_admin_linkage_shows_members_and_evidence_never_values(tmp_path: Path,
                                                                   fake: str) -> None:
    app = create_app(linkage_policy(tmp_path, "admin: {token: s3cret}\nrules: []\n",
                                    upstream=fake))
    admin = {"authorization": "Bearer s3cret"}
    async with client(app) as c:
        for key in ("key-alice", "key-carol", "key-dave"):
            await c.post(CHAT, **chat(key))
        report = await c.get("/admin/linkage/carol", headers=admin)
        alone = await c.get("/admin/linkage/dave", headers=admin)
        anonymous = await c.get("/admin/linkage/carol")
        wrong = await c.post("/admin/linkage/carol", headers=admin)
        unknown = await c.post("/admin/linkage/carol/explode", headers=admin)
    assert (anonymous.status_code, wrong.status_code, unknown.status_code) == (401, 405, 404)
    body = report.json()
    assert body["cluster"] == {"id": "alice", "size": 2, "linked_to_blocked": False}
    assert body["members"] == ["alice", "carol"]
    (link,) = body["links"]
    assert (link["a"], link["b"], link["weight"]) == ("alice", "carol", 1.0)
    assert [e["signal"] for e in link["evidence"]] == ["attribute:payment"]
    assert link["evidence"][0]["first_seen"] <= link["evidence"][0]["last_seen"]
    assert "card-1" not in report.text and "digest" not in report.text
    assert alone.json()["members"] == ["dave"] and alone.json()["links"] == []


async def test_admin_linkage_without_linkage_is_404(tmp_path: Path) -> None:
    app = create_app(write_policy(tmp_path, "admin: {token: s3cret}\nrules: []\n"))
    async with client(app) as c:
        r = await c.get("/admin/linkage/alice", headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 404


async def test_a_reload_keeps_the_graph_unless_linkage_changed(tmp_path: Path) -> None:
    path = linkage_policy(tmp_path, "rules: []\n")
    app = GuardMiddleware(usage_app, path)
    async with client(app) as c:
        for key in ("key-alice", "key-carol"):
            await c.post(CHAT, **chat(key))
        first = app.linkage
        assert first is not None
        app.swap(load_policy(path))
        assert app.linkage is first
        assert app.pipeline.enrichers == (first,)
        assert (await first.store.cluster("carol")).size == 2
        path.write_text(path.read_text().replace("window: 30d", "window: 7d"))
        app.swap(load_policy(path))
        second = app.linkage
        assert second is not None and second is not first
        assert (await second.store.cluster("carol")).size == 1, "a new graph"
        await asyncio.sleep(0.01)   # the old enricher closes on the loop
        assert not first.running
        await second.aclose()


def test_the_background_task_runs_with_the_app_lifespan(tmp_path: Path) -> None:
    app = create_app(linkage_policy(tmp_path, "rules: []\n"))
    enricher = app.guarded.linkage
    assert enricher is not None and not enricher.running
    with running_server(app):
        assert enricher.running, "started at startup, before any request"
    assert not enricher.running, "stopped at shutdown"


def test_the_enricher_restarts_on_a_new_event_loop(tmp_path: Path) -> None:
    """An app served again under another loop (a test client, a restart in-process)
    still drains its queue."""
    settings = load_policy(linkage_policy(tmp_path, "rules: []\n")).linkage
    assert settings is not None
    enricher = LinkageEnricher(settings, MemoryLinkageStore(settings), PairFinder(settings))
    account = Account("alice", "org-alice", "free", (("payment", "card-1"),))

    async def one() -> int:
        await enricher.enrich(Exchange("POST", CHAT, {}, "203.0.113.9", account=account))
        await enricher.drained()
        return enricher.counters.queued

    assert asyncio.run(one()) == 1
    assert asyncio.run(one()) == 2
