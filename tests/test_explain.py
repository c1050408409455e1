"""Explain (guardproxy/explain/): every rule kind explained against counters that real
requests through the middleware set up first, a denial of each, and proof that
explaining changes no counter, reservation, link or ledger entry."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from guardproxy import GuardMiddleware
from guardproxy.explain.engine import ExplainError, ExplainRequest, explain
from guardproxy.guards import rule_kinds
from guardproxy.guards.budget import BudgetGuard
from guardproxy.guards.canary import CanaryGuard
from guardproxy.guards.quota import QuotaGuard
from tests.conftest import sha, write_policy

CHAT = "/v1/chat/completions"
SECRET = "explain-test-secret-0123456789"
LINKAGE = f"""
linkage:
  secret: {SECRET}
  window: 30d
  signals:
    - {{attribute: payment, weight: 1.0, max_fanout: 5}}
"""
# alice, carol and frank pay with one card; dave on his own
PEOPLE = {"key-alice": ("alice", "card-1", "free"), "key-carol": ("carol", "card-1", "free"),
          "key-frank": ("frank", "card-1", "free"), "key-dave": ("dave", "card-2", "pro")}
TEXT = ("The river runs past the old mill and the children do not go there at night. "
        "It is said that the miller will not sell his flour to strangers. ") * 4


async def model_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A chat model: text, usage (completion = the forwarded max_tokens), and ``seen``:
    the body it received."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = json.loads(body) if body else {}
    cap = seen.get("max_tokens") or 1
    out = json.dumps({"id": "c1", "object": "chat.completion", "model": "m", "seen": seen,
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": TEXT}}],
                      "usage": {"prompt_tokens": 10, "completion_tokens": cap,
                                "total_tokens": 10 + cap}}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def people_policy(tmp: Path, rules: str, linkage: str = LINKAGE) -> Path:
    policy = write_policy(tmp, linkage + rules)
    lines = ["accounts:"]
    for key, (account, card, tier) in PEOPLE.items():
        lines += [f"  - id: {account}", f"    org: org-{account}", f"    tier: {tier}",
                  f"    key_sha256: {sha(key)}", f"    attributes: {{payment: {card}}}"]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    return policy


def client(app: GuardMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5000)),
                             base_url="http://proxy")


def chat(key: str, max_tokens: int = 5, **more: Any) -> dict[str, Any]:
    return {"json": {"model": "m", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": "hello there"}], **more},
            "headers": {"authorization": f"Bearer {key}"}}


async def dry(app: GuardMiddleware, doc: Any, **identity: Any) -> dict[str, Any]:
    pipeline = app.pipeline
    report: dict[str, Any] = await explain(
        pipeline, ExplainRequest.from_json(doc, pipeline.dialect),
        linkage=app.linkage.store if app.linkage else None, **identity)
    return report


def rule(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in report["rules"] if r["name"] == name]
    assert len(found) == 1, name
    return found[0]


BODY = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}


# -- quota ------------------------------------------------------------------------
async def test_quota_exhausted_by_real_requests_is_explained_as_a_denial(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, write_policy(tmp_path, """
rules:
  - name: free
    when: {tier: free}
    quota: 2/minute; 100/day
"""))
    async with client(app) as c:
        assert [(await c.post(CHAT, **chat("key-alice"))).status_code
                for _ in range(3)] == [200, 200, 429]
    report = await dry(app, BODY, account="alice")
    free = rule(report, "free")
    assert (free["matches"], free["decision"], free["status"]) == (True, "deny", 429)
    assert free["window"] == "2/minute"
    assert [w["remaining"] for w in free["windows"]] == [0, 98]
    assert "used up for account=alice" in free["why"]
    assert (report["allowed"], report["status"], report["denied_by"]) == (False, 429, "free")
    carol = await dry(app, BODY, account="carol")   # same tier, her own counter
    assert rule(carol, "free")["decision"] == "allow" and carol["allowed"]
    assert [w["remaining"] for w in rule(carol, "free")["windows"]] == [2, 100]
    bob = await dry(app, BODY, account="bob")
    assert (rule(bob, "free")["matches"], rule(bob, "free")["decision"]) == (False, "none")
    assert "tier 'pro'" in rule(bob, "free")["why"]


# -- budget -----------------------------------------------------------------------
async def test_budget_explains_its_clamp_and_the_body_the_upstream_then_gets(
        tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, write_policy(tmp_path, """
rules:
  - name: tokens
    budget: 100/day
    count: completion
    on_exhausted: clamp
    min_tokens: 16
"""))
    async with client(app) as c:
        assert (await c.post(CHAT, **chat("key-alice", 70))).status_code == 200
        asked = {**BODY, "max_tokens": 50}
        report = await dry(app, asked, account="alice")
        tokens = rule(report, "tokens")
        assert (tokens["decision"], tokens["cap"], tokens["clamped_from"]) == ("allow", 30, 50)
        assert tokens["windows"][0]["used"] == 70 and tokens["windows"][0]["remaining"] == 30
        assert report["forwarded_body"] == {**asked, "max_tokens": 30}
        # the real request: the upstream gets exactly the body explain showed
        real = await c.post(CHAT, json=asked, headers={"authorization": "Bearer key-alice"})
        assert real.json()["seen"] == report["forwarded_body"]
        # 0 left now; two completions of even min_tokens do not fit: a denial
        denied = await dry(app, {**asked, "n": 2}, account="alice")
    tokens = rule(denied, "tokens")
    assert (tokens["decision"], tokens["status"], tokens["window"]) == ("deny", 429, "100/86400s")
    assert "0 left in 100/86400s" in tokens["why"]
    assert denied["denied_by"] == "tokens" and not denied["allowed"]


async def test_a_default_cap_is_written_into_the_forwarded_body(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, write_policy(tmp_path, """
rules:
  - name: tokens
    budget: 100000/day
    default_max_tokens: 256
"""))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    report = await dry(app, body, account="alice")
    assert report["forwarded_body"] == {**body, "max_tokens": 256}
    async with client(app) as c:
        real = await c.post(CHAT, json=body, headers={"authorization": "Bearer key-alice"})
    assert real.json()["seen"] == report["forwarded_body"]
    streamed = await dry(app, {**body, "stream": True}, account="alice")
    assert streamed["forwarded_body"] == {**body, "stream": True, "max_tokens": 256,
                                          "stream_options": {"include_usage": True}}
    assert streamed["request"]["stream"] is True


# -- linkage ----------------------------------------------------------------------
async def test_linkage_rules_read_the_cluster_and_explain_a_denial(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, people_policy(tmp_path, """
rules:
  - name: per-cluster
    quota: 10/minute
    per: cluster
  - name: hydra-size
    linkage: {max_accounts: 2}
  - name: linked-to-blocked
    mode: shadow
    linkage: {linked_to: blocked}
"""))
    async with client(app) as c:
        codes = [(await c.post(CHAT, **chat(k))).status_code
                 for k in ("key-alice", "key-carol", "key-frank")]
    assert codes == [200, 200, 403]
    report = await dry(app, BODY, account="carol")
    hydra = rule(report, "hydra-size")
    assert (hydra["decision"], hydra["status"], hydra["window"]) == ("deny", 403,
                                                                     "max_accounts=2")
    assert hydra["cluster"]["size"] == 3 and report["cluster"]["size"] == 3
    assert rule(report, "per-cluster")["key"] == "cluster=alice"
    assert report["denied_by"] == "hydra-size"
    assert any("not recorded" in note for note in report["notes"])
    assert app.linkage is not None
    await app.linkage.store.block("dave")
    dave = await dry(app, BODY, account="dave")
    assert rule(dave, "hydra-size")["decision"] == "allow"
    blocked = rule(dave, "linked-to-blocked")
    assert (blocked["decision"], blocked["mode"]) == ("deny", "shadow")
    assert "shadow" in blocked["why"]
    assert dave["allowed"] and "linked-to-blocked" in dave["why"]


# -- canary -----------------------------------------------------------------------
async def test_canary_says_whether_the_response_would_be_marked(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, write_policy(tmp_path, f"""
rules:
  - name: marks
    when: {{tier: free}}
    canary: {{secret: {SECRET}}}
  - name: watch
    when: {{tier: pro}}
    mode: shadow
    canary: {{secret: {SECRET}}}
"""))
    alice = await dry(app, BODY, account="alice")
    assert alice["marked"] and rule(alice, "marks")["marks"] is True
    assert "would be marked" in rule(alice, "marks")["why"]
    exact = await dry(app, {**BODY, "logprobs": True}, account="alice")
    assert not exact["marked"] and rule(exact, "marks")["matches"] is False
    assert "exact" in rule(exact, "marks")["why"]
    other = await dry(app, {"path": "/v1/embeddings", "body": {"model": "e", "input": "x"}},
                      account="alice")
    assert "not a generation endpoint" in rule(other, "marks")["why"]
    bob = await dry(app, BODY, account="bob")
    watch = rule(bob, "watch")
    assert (watch["matches"], watch["decision"], bob["marked"]) == (True, "allow", False)
    assert "unchanged" in watch["why"] and "ledger" in watch["why"]


def test_every_registered_rule_kind_is_explained() -> None:
    """A new rule kind must come with its ``explain`` (and a test in this file)."""
    assert set(rule_kinds()) == {"quota", "budget", "linkage", "canary"}
    for key, kind in rule_kinds().items():
        module = sys.modules[kind.build.__module__]
        guards = [c for c in vars(module).values() if isinstance(c, type)
                  and c.__module__ == module.__name__ and hasattr(c, "check")]
        assert guards, key
        for cls in guards:
            assert inspect.iscoroutinefunction(getattr(cls, "explain", None)), cls


# -- no state changes ---------------------------------------------------------------
async def snapshot(app: GuardMiddleware) -> dict[Any, Any]:
    """Every counter the policy keeps: quota windows, budget windows, the link graph,
    the ledger."""
    pipeline, out = app.pipeline, dict[Any, Any]()
    for guard in pipeline.guards:
        for who in ("alice", "frank"):
            if isinstance(guard, QuotaGuard):
                out[guard.rule.name, who] = list((await guard.store.quota_state(
                    guard.ask(f"account={who}"))).remaining)
            elif isinstance(guard, BudgetGuard):
                out[guard.rule.name, who] = [
                    (w.used, w.reserved) for w in await pipeline.state.budgets.usage(
                        guard.subject(f"account={who}"), guard.settings.windows)]
            elif isinstance(guard, CanaryGuard) and guard.ledger is not None:
                out["ledger"] = len([e async for e in guard.ledger.entries()])
    assert app.linkage is not None
    out["graph"] = (await app.linkage.store.graph()).as_json()
    return out


async def test_explain_changes_no_counter(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, people_policy(tmp_path, f"""
rules:
  - name: requests
    quota: 3/minute
  - name: tokens
    budget: 1000/day
  - name: hydra-size
    linkage: {{max_accounts: 5}}
  - name: marks
    canary: {{secret: {SECRET}}}
"""))
    async with client(app) as c:
        for key in ("key-alice", "key-carol"):
            assert (await c.post(CHAT, **chat(key))).status_code == 200
        before = await snapshot(app)
        assert before["ledger"] == 2 and before["requests", "alice"] == [2]
        for _ in range(5):
            for who in ("alice", "frank"):   # frank: never seen, shares alice's card
                report = await dry(app, BODY, account=who)
                assert report["allowed"] and report["marked"]
        assert await snapshot(app) == before
        assert rule(report, "hydra-size")["cluster"]["size"] == 1, "frank is not recorded"
        # the quota still has exactly two requests left for alice
        codes = [(await c.post(CHAT, **chat("key-alice"))).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


# -- identity and refusals ------------------------------------------------------------
async def test_identity_from_key_headers_or_account_and_refusals(tmp_path: Path) -> None:
    app = GuardMiddleware(model_app, write_policy(tmp_path, """
unguarded: [/health]
rules:
  - name: free
    quota: 5/minute
"""))
    by_key = await dry(app, BODY, key="key-bob")
    assert by_key["account"] == {"id": "bob", "org": "acme", "tier": "pro"}
    envelope = {"method": "post", "path": "/v1/chat/completions", "body": BODY,
                "headers": {"Authorization": "Bearer key-carol"}}
    assert (await dry(app, envelope))["account"]["id"] == "carol"
    nobody = await dry(app, BODY)
    assert (nobody["allowed"], nobody["status"], nobody["rules"]) == (False, 401, [])
    assert "refused before any rule" in nobody["why"]
    bad = await dry(app, {"path": CHAT, "body": "{not json"}, account="alice")
    assert bad["status"] == 400
    assert (await dry(app, {"path": "/health"}))["unguarded"] is True
    for wrong, status in (({"account": "zed"}, 404), ({"key": "key-zed"}, 404),
                          ({"account": "alice", "ip": "nope"}, 400)):
        try:
            await dry(app, BODY, **wrong)
        except ExplainError as exc:
            assert exc.status == status
        else:
            raise AssertionError(f"{wrong} was accepted")
    assert (await dry(app, {"path": CHAT + "?x=1", "body": BODY}, account="alice",
                      ip="203.0.113.9"))["request"]["path"] == CHAT
