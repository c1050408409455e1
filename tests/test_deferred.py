"""Generation the proxy never sees cannot be budgeted: batches and background responses
are refused where a budget applies, and pass where none does."""

from __future__ import annotations

import json
from pathlib import Path

from guardproxy import GuardMiddleware
from tests.test_request_plan import (
    ANTHROPIC_KEY,
    BUDGET,
    Upstream,
    call,
    json_headers,
    policy,
    window,
)

BATCH = json.dumps({"requests": [{"custom_id": "a", "params": {
    "model": "m", "max_tokens": 100000, "messages": []}}]}).encode()
BACKGROUND = json.dumps({"model": "m", "input": "hi", "background": True}).encode()


async def test_anthropic_message_batches_are_refused_under_a_budget(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, dialect="anthropic"))
    reply = await call(app, "POST", "/v1/messages/batches", body=BATCH,
                       headers={**ANTHROPIC_KEY, "content-type": "application/json"})
    assert reply.status == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert not up.seen and (await window(app)).used == 0


async def test_openai_batches_and_background_responses_are_refused(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    for path, body in (("/v1/batches", b'{"input_file_id": "f", "endpoint": '
                                       b'"/v1/chat/completions"}'),
                       ("/v1/responses", BACKGROUND)):
        reply = await call(app, "POST", path, body=body, headers=json_headers())
        assert reply.status == 400, (path, reply.body)
    assert not up.seen


async def test_without_a_budget_batches_pass(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, "rules:\n  - name: q\n    quota: 5/minute\n"))
    reply = await call(app, "POST", "/v1/batches", body=b'{"input_file_id": "f"}',
                       headers=json_headers())
    assert reply.status == 200 and len(up.seen) == 1
