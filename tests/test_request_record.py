"""Every guarded request ends in exactly one ``RequestRecord`` for the observers: what
was decided, charged, sent and how it ended (the audit trail and metrics read it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from guardproxy import GuardMiddleware
from guardproxy.observe import NullObserver, RequestRecord
from tests.conftest import write_policy
from tests.test_budget import usage_app

CHAT = "/v1/chat/completions"
RULES = """
rules:
  - {name: two-a-minute, quota: 2/minute}
  - {name: watch, quota: 1/minute, mode: shadow}
  - name: tokens
    budget: 100000/day
    audit: {include: [prompt]}
    when: {account: bob}
"""


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def completed(self, record: RequestRecord) -> None:
        self.records.append(record)


def body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 40, "messages": [{"role": "user", "content": text}],
            **extra}


async def run(tmp_path: Path, *calls: tuple[str, str, dict[str, Any] | None]) -> list[Any]:
    recorder = Recorder()
    app = GuardMiddleware(usage_app, write_policy(tmp_path, RULES), observer=recorder)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as client:
        for key, path, payload in calls:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            await client.post(path, json=payload, headers=headers)
    return recorder.records


async def test_one_record_per_request_with_decisions_and_tokens(tmp_path: Path) -> None:
    records = await run(tmp_path, ("key-bob", CHAT, body()), ("key-bob", CHAT, body()),
                        ("key-bob", CHAT, body()))
    assert [r.status for r in records] == [200, 200, 429]
    first, second, third = records
    assert (first.account, first.org, first.tier, first.route, first.dialect) == \
        ("bob", "acme", "pro", "chat", "openai")
    assert first.ending == "completed" and first.method == "POST" and first.path == CHAT
    assert {(d.rule, d.mode, d.allowed) for d in first.decisions} == {
        ("two-a-minute", "enforce", True), ("watch", "shadow", True), ("tokens", "enforce", True)}
    # the shadow rule's second request is a shadow denial; the request goes on
    assert ("watch", "shadow", False) in {(d.rule, d.mode, d.allowed) for d in second.decisions}
    tokens = next(d for d in first.decisions if d.rule == "tokens")
    assert tokens.reserved is not None and tokens.reserved > 0
    assert first.tokens_reserved == tokens.reserved and first.tokens_settled == tokens.charged
    assert 0 < first.tokens_settled < first.tokens_reserved
    assert first.bytes_in > 0 and first.bytes_out > 0 and first.request_id
    assert first.upstream_seconds is not None and first.ttfb_seconds is not None
    assert third.ending == "denied" and third.upstream_seconds is None
    assert third.tokens_reserved == 0
    denied = next(d for d in third.decisions if not d.allowed and d.mode == "enforce")
    assert denied.rule == "two-a-minute" and denied.window
    # the rule that opted in to the prompt decided bob's requests
    assert first.prompt == "hello there"


async def test_text_only_where_a_rule_opted_in(tmp_path: Path) -> None:
    (alice,) = await run(tmp_path, ("key-alice", CHAT, body("secret plans")))
    assert alice.prompt is None and alice.response is None


async def test_refused_and_failed_requests_are_recorded_too(tmp_path: Path) -> None:
    records = await run(tmp_path, ("", CHAT, body()), ("key-alice", "/v1/%2e%2e/x", body()),
                        ("key-alice", CHAT, body(fail=True)))
    assert [(r.status, r.ending) for r in records] == [
        (401, "denied"), (400, "denied"), (502, "upstream_failed")]
    assert records[0].account is None and records[2].account == "alice"
    assert records[2].upstream_seconds is not None
