"""Whatever JSON a client sends, the guards answer in the dialect's shape or forward it:
never an exception, never a bare 500."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from guardproxy import GuardMiddleware
from tests.conftest import write_policy
from tests.test_budget import usage_app

RULES = """
rules:
  - name: requests
    quota: 1000000/minute
  - name: tokens
    budget: 100000000/day
    on_exhausted: clamp
    default_max_tokens: 50
  - name: marks
    canary: {secret: fuzz-secret-0123456789abcdef}
"""
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "n", "best_of",
          "stream", "stream_options", "response_format", "logprobs", "stop", "system",
          "content", "role", "text", "include", "input", "tools"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4), max_leaves=25)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8) | values


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                          "/v1/responses", "/v1/messages"]),
       dialect=st.sampled_from(["openai", "anthropic"]))
async def test_any_json_body_gets_an_answer_in_shape(tmp_path: Path, body: object,
                                                     path: str, dialect: str) -> None:
    app = GuardMiddleware(_echo_usage, write_policy(tmp_path, RULES, dialect=dialect))
    key = {"authorization": "Bearer key-alice"} if dialect == "openai" \
        else {"x-api-key": "key-alice"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://proxy") as c:
        r = await c.post(path, content=json.dumps(body), headers={
            **key, "content-type": "application/json"})
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400, 413, 429), r.text
    if r.status_code != 200:
        error = r.json()
        assert ("error" in error) if dialect == "openai" else error["type"] == "error"


async def _echo_usage(scope: dict[str, object], receive: object, send: object) -> None:
    """usage_app, unless the forwarded body is one it cannot read: then a plain answer."""
    try:
        await usage_app(scope, receive, send)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError, KeyError):
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]
