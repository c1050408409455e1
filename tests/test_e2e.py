"""The proxy under a real uvicorn server, in front of the fake model, with the official
SDKs as clients (httpx's ASGITransport would buffer whole bodies)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from starlette.types import Receive, Scope, Send

from guardproxy.app import ProxyApp, create_app
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.servers import running_server

RULES = """
rules:
  - name: free-requests
    when: {tier: free}
    quota: 3/minute
  - name: tokens
    budget: 5000/day
    per: account
"""
UPSTREAM_KEY = "upstream-secret-123"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


def start(tmp: Path, upstream: str, rules: str = RULES, dialect: str = "openai",
          timeout: str = "5s") -> tuple[ProxyApp, Path]:
    policy = write_policy(tmp, rules, upstream=upstream, dialect=dialect)
    text = policy.read_text().replace(
        "timeout: 5s", f"timeout: {timeout}, headers: {{Authorization: 'Bearer {UPSTREAM_KEY}'}}")
    policy.write_text(text)
    return create_app(policy), policy


def oai(url: str, key: str = "key-bob") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def used_tokens(app: ProxyApp, account: str = "bob") -> tuple[int, int]:
    budget = next(g for g in app.guarded.pipeline.guards if g.rule.name == "tokens")

    async def read() -> tuple[int, int]:
        (day,) = await app.guarded.pipeline.state.budgets.usage(
            f"tokens|account={account}", budget.rule.settings.windows)
        return day.used, day.reserved

    return asyncio.run(read())


def settled_tokens(app: ProxyApp, account: str = "bob") -> tuple[int, int]:
    """``used_tokens`` once every response has settled: a stream's charge is settled just
    after its last byte reaches the client, so a reading right after can precede it."""
    deadline = time.monotonic() + 10
    used, reserved = used_tokens(app, account)
    while reserved and time.monotonic() < deadline:
        time.sleep(0.02)
        used, reserved = used_tokens(app, account)
    return used, reserved


def test_openai_sdk_json_stream_and_typed_errors(tmp_path: Path, fake: str) -> None:
    app, _ = start(tmp_path, fake)
    with running_server(app) as url:
        client = oai(url, "key-alice")
        raw = client.chat.completions.with_raw_response.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hello there"}])
        completion = raw.parse()
        assert completion.choices[0].message.content.startswith("Fake answer")
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-limit-tokens"] == "5000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 5000
        chunks = list(client.chat.completions.create(
            model="m", max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 4
        # the usage chunk guardproxy asked for is not shown to a client that did not ask
        assert all(c.usage is None for c in chunks)
        client.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.RateLimitError) as denied:
            client.chat.completions.create(model="m", messages=[])
        assert int(denied.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.AuthenticationError):
            oai(url, "wrong-key").chat.completions.create(model="m", messages=[])


def test_anthropic_sdk_json_stream_and_typed_errors(tmp_path: Path, fake: str) -> None:
    app, _ = start(tmp_path, fake, dialect="anthropic")
    with running_server(app) as url:
        client = anthropic.Anthropic(base_url=url, api_key="key-alice", max_retries=0)
        raw = client.messages.with_raw_response.create(
            model="claude-x", max_tokens=6, messages=[{"role": "user", "content": "hello"}])
        message = raw.parse()
        assert message.usage.output_tokens == 6
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "3"
        assert raw.headers["anthropic-ratelimit-tokens-limit"] == "5000"
        with client.messages.stream(model="claude-x", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert len(text.split()) == 5 and final.usage.output_tokens == 5
        client.messages.create(model="claude-x", max_tokens=1, messages=[])
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(model="claude-x", max_tokens=1, messages=[])
        bad = anthropic.Anthropic(base_url=url, api_key="nope", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model="claude-x", max_tokens=1, messages=[])


def test_budget_charges_real_usage_across_shapes(tmp_path: Path, fake: str) -> None:
    app, _ = start(tmp_path, fake, rules=RULES.replace("quota: 3/minute", "quota: 99/minute"))
    with running_server(app) as url:
        client = oai(url)
        msgs = [{"role": "user", "content": "one two three"}]  # 3 words + 3 = 6 prompt tokens
        client.chat.completions.create(model="m", max_tokens=7, messages=msgs)
        list(client.chat.completions.create(model="m", max_tokens=8, stream=True, messages=msgs))
        list(client.chat.completions.create(model="m", max_tokens=9, stream=True, messages=msgs,
                                            stream_options={"include_usage": True}))
        # no usage reported at all: charged by estimating the streamed text, never zero
        list(client.chat.completions.create(model="m", max_tokens=10, stream=True,
                                            messages=msgs,
                                            extra_headers={"x-fake-no-usage": "1"}))
        used, reserved = settled_tokens(app)
    assert reserved == 0
    reported = (6 + 7) + (6 + 8) + (6 + 9)
    assert used > reported + 6  # the estimated response is charged something
    assert used < reported + 200


def test_client_disconnect_mid_stream_is_charged_its_reservation(tmp_path: Path,
                                                                 fake: str) -> None:
    app, _ = start(tmp_path, fake)
    with running_server(app) as url:
        body = {"model": "m", "max_tokens": 40, "stream": True,
                "messages": [{"role": "user", "content": "go"}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10,
                          headers={"authorization": "Bearer key-bob",
                                   "x-fake-chunk-delay": "0.2"}) as r:
            next(r.iter_raw())
        deadline = time.monotonic() + 5
        while used_tokens(app)[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        used, reserved = used_tokens(app)
    assert reserved == 0
    assert used >= 40 + 1  # the whole reservation: cap plus the prompt estimate


def test_stream_chunks_are_not_buffered(tmp_path: Path, fake: str) -> None:
    app, _ = start(tmp_path, fake)
    with running_server(app) as url:
        body = {"model": "m", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "go"}]}
        arrivals = []
        t0 = time.monotonic()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10,
                          headers={"authorization": "Bearer key-bob",
                                   "x-fake-chunk-delay": "0.25"}) as r:
            for chunk in r.iter_raw():
                if chunk.strip():
                    arrivals.append(time.monotonic() - t0)
    # 8 events, 0.25 s apart: the first must arrive long before the last is produced
    assert arrivals[0] < 0.6
    assert arrivals[-1] > 1.5
    assert len(arrivals) >= 6


def _normalise(data: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', data)


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_bytes_are_faithful(tmp_path: Path, fake: str, include_usage: bool) -> None:
    app, _ = start(tmp_path, fake)
    body: dict[str, object] = {"model": "m", "max_tokens": 6, "stream": True,
                               "messages": [{"role": "user", "content": "same"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with running_server(app) as url:
        via = httpx.post(url + "/v1/chat/completions", json=body, timeout=10,
                         headers={"authorization": "Bearer key-bob"})
    direct = httpx.post(fake + "/v1/chat/completions", json=body, timeout=10)
    assert via.headers["content-type"].startswith("text/event-stream")
    assert _normalise(via.content) == _normalise(direct.content)


def test_credentials_and_cookies_never_cross(tmp_path: Path, fake: str) -> None:
    app, _ = start(tmp_path, fake)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        first = c.post("/v1/chat/completions", json={"model": "m", "messages": []},
                       headers={"authorization": "Bearer key-bob", "x-api-key": "key-bob"})
        c.cookies.clear()
        second = c.post("/v1/chat/completions", json={"model": "m", "messages": []},
                        headers={"authorization": "Bearer key-bob"})
    # the upstream's key never reaches a client, not even echoed: compare its hash
    assert first.headers["x-fake-saw-authorization-sha256"] == hashlib.sha256(
        f"Bearer {UPSTREAM_KEY}".encode()).hexdigest()
    assert first.headers["x-fake-saw-api-key"] == "-"
    assert second.headers["x-fake-saw-cookie"] == "-", "the proxy must keep no cookie jar"
    # (the fake model echoes what it saw; nothing else may carry the upstream key back)
    others = [v for k, v in first.headers.items() if not k.startswith("x-fake-saw-")]
    assert not any(UPSTREAM_KEY in v for v in others) and UPSTREAM_KEY not in first.text


def test_upstream_down_is_502_in_dialect_shape(tmp_path: Path) -> None:
    app, _ = start(tmp_path, "http://127.0.0.1:1", dialect="anthropic")
    with running_server(app) as url:
        client = anthropic.Anthropic(base_url=url, api_key="key-bob", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as err:
            client.messages.create(model="m", max_tokens=5, messages=[])
    assert err.value.status_code == 502
    assert err.value.body["type"] == "error"  # type: ignore[index]


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await asyncio.sleep(3)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    with running_server(slow_app, lifespan="off") as slow:
        app, _ = start(tmp_path, slow, timeout="0.5s")
        with running_server(app) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": []},
                           headers={"authorization": "Bearer key-bob"}, timeout=10)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "server_error"
