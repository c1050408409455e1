"""The audit trail through the middleware: one line per guarded request, what it says
for allowed, denied, shadow-denied, unidentified, upstream-failed and disconnected
requests, and prompts only where a rule opted in. Every audit file any test of
``test_audit*`` writes is scanned for secrets and prompts (``no_secret_in_any_line``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message

from guardproxy import GuardMiddleware
from guardproxy.app import create_app
from guardproxy.audit.line import GENESIS, line_hash
from guardproxy.audit.trail import audit_trails
from tests.conftest import ACCOUNTS, sha, write_policy
from tests.servers import running_server
from tests.test_middleware_edges import STREAM_REQUEST, StreamingUpstream
from tests.test_request_plan import call, json_headers

ADMIN_TOKEN = "admin-token-5f1c9e"
LINKAGE_SECRET = "linkage-secret-0123456789"
RAW_VALUES = ("card-fp-77aa", "mallory@example.com", "device-9b3e7d")   # linkage raw values
SECRET_PROMPT = "PROMPT-SECRET"    # in every prompt no rule opted in for
OPTED_PROMPT = "PROMPT-OPTED-IN"   # only where a rule asks for the prompt
SECRETS = (*ACCOUNTS, *(sha(k) for k in ACCOUNTS), "key-wrong", ADMIN_TOKEN, LINKAGE_SECRET,
           *RAW_VALUES, SECRET_PROMPT, "upstream-secret-123")


def scan(folder: Path) -> int:
    """Lines of every audit file under ``folder``; fails on a secret in any of them."""
    lines = 0
    for file in sorted(f for f in folder.rglob("audit*") if f.is_file()):   # no FIFO
        for number, line in enumerate(file.read_bytes().splitlines(), 1):
            lines += 1
            for secret in SECRETS:
                assert secret.encode() not in line, f"{file}:{number} holds {secret!r}"
    return lines


@pytest.fixture(autouse=True)
def no_secret_in_any_line(tmp_path: Path) -> Iterator[None]:
    yield
    scan(tmp_path)


RULES = """
audit:
  path: {audit}
  chain: true
rules:
  - name: watch
    quota: 1/minute
    mode: shadow
  - name: free-requests
    when: {{tier: free}}
    quota: 2/minute
  - name: investigate
    when: {{account: carol}}
    quota: 1000/minute
    audit: {{include: [prompt]}}
  - name: tokens
    budget: 100000/day
    per: account
    default_max_tokens: 100
"""


def audited(tmp: Path, **kw: Any) -> tuple[Path, Path]:
    """(policy, audit file) with ``RULES``."""
    audit = tmp / "audit.jsonl"
    return write_policy(tmp, RULES.format(audit=audit), **kw), audit


async def lines(app: GuardMiddleware, audit: Path) -> dict[str, dict[str, Any]]:
    """The trail's lines by request id, once the writer has flushed and closed."""
    await audit_trails(app.state).aclose()
    out = {}
    for text in (await asyncio.to_thread(audit.read_text)).splitlines():
        line = json.loads(text)
        out[line["request_id"]] = line
    return out


def chat(prompt: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]}).encode()


async def ask(app: GuardMiddleware, rid: str, key: str | None = "key-alice",
              prompt: str = SECRET_PROMPT + " hello") -> int:
    headers = {"content-type": "application/json", "x-request-id": rid}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return (await call(app, "POST", "/v1/chat/completions", headers=headers,
                       body=chat(prompt))).status


def decisions(line: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each rule's decision, without its timing (checked on its own: a duration)."""
    assert all(isinstance(d["seconds"], float) for d in line["decisions"])
    return {d["rule"]: {k: v for k, v in d.items() if k != "seconds"}
            for d in line["decisions"]}


async def test_allowed_shadow_denied_and_denied_lines(tmp_path: Path) -> None:
    policy, audit = audited(tmp_path)
    app = GuardMiddleware(StreamingUpstream(), policy)
    statuses = [await ask(app, f"a{i}") for i in range(3)]
    assert statuses == [200, 200, 429]
    got = await lines(app, audit)
    assert list(got) == ["a0", "a1", "a2"], "one line per request, in order"

    ok = got["a0"]
    assert {k: ok[k] for k in ("method", "path", "route", "dialect", "status", "ending",
                               "account", "org", "tier", "cluster", "ip", "model")} == {
        "method": "POST", "path": "/v1/chat/completions", "route": "chat",
        "dialect": "openai", "status": 200, "ending": "completed", "account": "alice",
        "org": "acme", "tier": "free", "cluster": None, "ip": "127.0.0.1", "model": "m"}
    assert decisions(ok) == {
        "watch": {"rule": "watch", "mode": "shadow", "allowed": True},
        "free-requests": {"rule": "free-requests", "mode": "enforce", "allowed": True},
        "tokens": {"rule": "tokens", "mode": "enforce", "allowed": True,
                   "reserved": ok["tokens"]["reserved"], "charged": 10 + 1}}
    assert ok["tokens"] == {"reserved": ok["tokens"]["reserved"], "settled": 11}
    assert ok["tokens"]["reserved"] > 100, "prompt estimate + the default cap"
    assert 0 <= ok["ttfb_seconds"] <= ok["upstream_seconds"] <= ok["duration_seconds"]
    assert ok["bytes_in"] > 0 and ok["bytes_out"] > 0   # bytes_in: as forwarded (reshaped)
    assert ok["canary_key_id"] is None and ok["ledger_entry_id"] is None
    assert "prompt" not in ok and "response" not in ok
    assert isinstance(ok["time"], float) and ok["time"] <= got["a1"]["time"]

    shadow = got["a1"]
    assert shadow["status"] == 200 and shadow["ending"] == "completed"
    assert decisions(shadow)["watch"]["allowed"] is False
    assert decisions(shadow)["watch"]["mode"] == "shadow"
    assert "1" in decisions(shadow)["watch"]["window"], "the window that decided"

    denied = got["a2"]
    assert (denied["status"], denied["ending"]) == (429, "denied")
    assert decisions(denied)["free-requests"] == {
        "rule": "free-requests", "mode": "enforce", "allowed": False,
        "window": decisions(denied)["free-requests"]["window"]}
    assert "2" in decisions(denied)["free-requests"]["window"]
    assert "tokens" not in decisions(denied), "evaluation stopped at the denial"
    assert denied["tokens"] == {"reserved": 0, "settled": 0}
    assert denied["upstream_seconds"] is None and denied["ttfb_seconds"] is None
    assert denied["bytes_in"] == len(chat(SECRET_PROMPT + " hello")) and denied["bytes_out"] > 0

    # chain: true: each line names the hash of the one before
    raw = audit.read_bytes().splitlines()
    assert [json.loads(r)["prev"] for r in raw] == [GENESIS, *map(line_hash, raw[:-1])]


async def test_unidentified_requests_have_a_line_without_an_account(tmp_path: Path) -> None:
    policy, audit = audited(tmp_path)
    app = GuardMiddleware(StreamingUpstream(), policy)
    assert await ask(app, "nokey", key=None) == 401
    assert await ask(app, "badkey", key="key-wrong") == 401
    got = await lines(app, audit)
    for rid in ("nokey", "badkey"):
        line = got[rid]
        assert (line["status"], line["ending"], line["account"]) == (401, "denied", None)
        assert line["decisions"] == [] and line["ip"] == "127.0.0.1"


async def test_prompt_only_for_the_requests_the_opted_in_rule_decided(tmp_path: Path) -> None:
    policy, audit = audited(tmp_path)
    app = GuardMiddleware(StreamingUpstream(), policy)
    assert await ask(app, "carol", key="key-carol", prompt=OPTED_PROMPT + " one") == 200
    assert await ask(app, "bob", key="key-bob") == 200
    got = await lines(app, audit)
    assert got["carol"]["prompt"] == OPTED_PROMPT + " one"
    assert "investigate" in decisions(got["carol"])
    assert "prompt" not in got["bob"] and "investigate" not in decisions(got["bob"])


async def test_include_at_the_top_puts_the_prompt_on_every_line(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path, f"audit: {{path: {audit}, include: [prompt]}}\n"
                          "rules: []\n")
    app = GuardMiddleware(StreamingUpstream(), policy)
    await ask(app, "one", prompt=OPTED_PROMPT + " two")
    got = await lines(app, audit)
    assert got["one"]["prompt"] == OPTED_PROMPT + " two"
    assert "prev" not in got["one"], "no chain unless asked"


async def test_client_leaving_mid_stream_is_a_disconnected_line(tmp_path: Path) -> None:
    policy, audit = audited(tmp_path)
    app = GuardMiddleware(StreamingUpstream(chunks=5), policy)
    bodies = 0

    async def gone_after_two_chunks(message: Message) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies > 2:
                raise OSError("client disconnected")

    with contextlib.suppress(OSError):
        await call(app, "POST", "/v1/chat/completions",
                   headers={**json_headers({"authorization": "Bearer key-bob"}),
                            "x-request-id": "gone"},
                   body=json.dumps(STREAM_REQUEST).encode(), send=gone_after_two_chunks)
    line = (await lines(app, audit))["gone"]
    assert (line["status"], line["ending"], line["account"]) == (200, "disconnected", "bob")
    assert line["tokens"]["settled"] == line["tokens"]["reserved"] > 1000, \
        "charged the whole reservation"
    assert line["upstream_seconds"] is not None and line["bytes_out"] > 0


def test_upstream_unreachable_is_a_502_line_flushed_at_shutdown(tmp_path: Path) -> None:
    policy, audit = audited(tmp_path)   # write_policy's upstream: 127.0.0.1:9, closed
    with running_server(create_app(policy)) as url:
        r = httpx.post(url + "/v1/chat/completions", content=chat(SECRET_PROMPT),
                       headers={"authorization": "Bearer key-bob", "x-request-id": "down",
                                "content-type": "application/json"}, timeout=10)
    assert r.status_code == 502
    (line,) = [json.loads(t) for t in audit.read_text().splitlines()]   # lifespan flushed it
    assert (line["request_id"], line["status"], line["ending"]) == ("down", 502,
                                                                    "upstream_failed")
    assert line["account"] == "bob" and line["upstream_seconds"] is not None
    assert line["tokens"]["settled"] == 0 and decisions(line)["tokens"]["charged"] == 0
