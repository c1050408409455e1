"""Quota rules through the real middleware (in-process ASGI; no streaming here)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from starlette.types import Receive, Scope, Send

from guardproxy import GuardMiddleware
from tests.conftest import write_policy


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = {k.decode(): v.decode() for k, v in scope["headers"]}
    out = json.dumps({"headers": seen, "body": body.decode(),
                      "account": scope["state"]["guardproxy"].account.id}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def client_for(app: GuardMiddleware, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 5000)),
                             base_url="http://proxy")


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_quota_per_account_denies_with_dialect_error(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, """
rules:
  - name: free
    when: {tier: free}
    quota: 2/minute
"""))
    async with client_for(app) as c:
        for remaining in (1, 0):
            r = await c.post("/v1/chat/completions", json={"model": "m"},
                             headers=bearer("key-alice"))
            assert r.status_code == 200
            assert r.headers["x-ratelimit-remaining-requests"] == str(remaining)
        denied = await c.post("/v1/chat/completions", json={"model": "m"},
                              headers=bearer("key-alice"))
        assert denied.status_code == 429
        assert denied.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(denied.headers["retry-after"]) >= 1
        assert denied.headers["x-ratelimit-limit-requests"] == "2"
        # another account and another tier are unaffected
        assert (await c.post("/v1/x", json={}, headers=bearer("key-carol"))).status_code == 200
        assert (await c.post("/v1/x", json={}, headers=bearer("key-bob"))).status_code == 200


async def test_per_org_and_model_and_shadow(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, """
rules:
  - name: shadow-all
    quota: 1/minute
    per: ip
    mode: shadow
  - name: org-model
    quota: 1/minute
    per: [org, model]
"""))
    async with client_for(app) as c:
        r1 = await c.post("/v1/x", json={"model": "a"}, headers=bearer("key-alice"))
        # same org (acme), same model: denied although the shadow rule was hit first
        r2 = await c.post("/v1/x", json={"model": "a"}, headers=bearer("key-bob"))
        r3 = await c.post("/v1/x", json={"model": "b"}, headers=bearer("key-bob"))
        r4 = await c.post("/v1/x", json={"model": "a"}, headers=bearer("key-carol"))
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200, 429, 200, 200]
    assert "org-model" in r2.json()["error"]["message"]
    # a shadow rule enforces nothing, so it must not show in the rate-limit headers either
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (r3, r4)] == ["0", "0"]
    assert r4.headers["x-ratelimit-limit-requests"] == "1"


async def test_shadow_rules_stay_out_of_rate_headers(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, """
rules:
  - name: watch
    quota: 1/minute
    mode: shadow
  - name: enforce
    quota: 5/minute
"""))
    async with client_for(app) as c:
        responses = [await c.post("/v1/x", json={}, headers=bearer("key-alice"))
                     for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["4", "3", "2"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in responses} == {"5"}


async def test_client_key_removed_and_identity_passed(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, "rules: []\n"))
    async with client_for(app) as c:
        r = await c.post("/v1/x", content=b'{"a": 1}',
                         headers={**bearer("key-alice"), "content-type": "application/json",
                                  "x-api-key": "key-alice"})
    seen = r.json()
    assert "authorization" not in seen["headers"] and "x-api-key" not in seen["headers"]
    assert seen["body"] == '{"a": 1}' and seen["account"] == "alice"


async def test_auth_and_malformed_json_errors(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, "rules: []\n", dialect="anthropic"))
    async with client_for(app) as c:
        missing = await c.post("/v1/messages", json={})
        bad = await c.post("/v1/messages", content=b"{nope",
                           headers={"x-api-key": "key-alice", "content-type": "application/json"})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_body_size_limit(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "rules: []\n")
    policy.write_text(policy.read_text().replace("clients: {trusted_proxies: [10.0.0.0/8]}",
                                                 "clients: {max_body_bytes: 100}"))
    app = GuardMiddleware(echo_app, policy)
    async with client_for(app) as c:
        r = await c.post("/v1/x", json={"p": "x" * 200}, headers=bearer("key-alice"))
    assert r.status_code == 413


async def test_non_json_bodies_pass_unparsed(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, "rules: []\n"))
    async with client_for(app) as c:
        r = await c.post("/v1/audio", content=b"\x00raw{", headers={
            **bearer("key-alice"), "content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["body"] == "\x00raw{"


async def test_headers_show_the_shortest_window_and_a_denial_its_own(tmp_path: Path) -> None:
    app = GuardMiddleware(echo_app, write_policy(tmp_path, """
rules:
  - name: both
    quota: 5/minute; 3/day
"""))
    async with client_for(app) as c:
        answers = [await c.post("/v1/x", json={}, headers=bearer("key-alice"))
                   for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers[:3]] == ["4", "3", "2"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers[:3]} == {"5"}
    denied = answers[3]
    assert denied.headers["x-ratelimit-limit-requests"] == "3", "the window that denied"
    assert int(denied.headers["retry-after"]) > 60, "waits for the day window, not the minute"
