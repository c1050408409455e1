"""The middleware's edges: rate headers merged with the upstream's, request ids,
unguarded paths and WebSockets, streamed usage, and how an exchange ends (the upstream
breaks off, the inner app fails, the client leaves) — each ending charged what was
generated. Streams run against a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from guardproxy import GuardMiddleware, UpstreamError
from guardproxy.exchange import RequestInfo
from guardproxy.state.budgets import WindowState
from guardproxy.tokens import estimate_prompt
from tests.servers import running_server
from tests.test_request_plan import (
    ANTHROPIC_KEY,
    BUDGET,
    OPENAI_KEY,
    PROMPT_TOKENS,
    Upstream,
    call,
    chat,
    json_headers,
    policy,
    window,
)

QUOTA = """
rules:
  - name: requests
    quota: 5/minute
"""


# -- 8. rate-limit headers: one value each, the tighter set -----------------------------


def upstream_rates(limit: str, remaining: str, reset: str, resource: str = "requests",
                   case: str = "lower") -> list[tuple[bytes, bytes]]:
    names = [f"x-ratelimit-{part}-{resource}" for part in ("limit", "remaining", "reset")]
    if case == "mixed":
        names = [n.replace("x-ratelimit", "X-RateLimit").title() for n in names]
    return [(n.encode(), v.encode()) for n, v in zip(names, (limit, remaining, reset),
                                                     strict=True)]


def only(reply: Any, name: str) -> str:
    values = reply.header(name)
    assert len(values) == 1, f"{name}: {values}"
    return str(values[0])


@pytest.mark.parametrize("case", ["lower", "mixed"])
async def test_ours_is_tighter_so_ours_win(tmp_path: Path, case: str) -> None:
    up = Upstream(headers=upstream_rates("9999", "9998", "1ms", case=case))
    app = GuardMiddleware(up, policy(tmp_path, QUOTA))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat())
    assert reply.status == 200
    assert only(reply, "x-ratelimit-limit-requests") == "5"
    assert only(reply, "x-ratelimit-remaining-requests") == "4"
    assert only(reply, "x-ratelimit-reset-requests") != "1ms"


async def test_upstream_is_tighter_so_its_set_wins(tmp_path: Path) -> None:
    up = Upstream(headers=upstream_rates("3", "0", "7s"))
    app = GuardMiddleware(up, policy(tmp_path, QUOTA))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat())
    assert reply.status == 200
    assert [only(reply, f"x-ratelimit-{p}-requests") for p in ("limit", "remaining", "reset")] \
        == ["3", "0", "7s"]


async def test_token_headers_merge_like_request_headers(tmp_path: Path) -> None:
    up = Upstream(headers=upstream_rates("2000000", "1999000", "1s", resource="tokens"))
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat())
    assert only(reply, "x-ratelimit-limit-tokens") == "100000"
    assert int(only(reply, "x-ratelimit-remaining-tokens")) < 100000


@pytest.mark.parametrize("sent", [("limit",), ("reset",), ("limit", "reset")])
async def test_one_value_per_header_whatever_the_upstream_sends(tmp_path: Path,
                                                                sent: tuple[str, ...]) -> None:
    """An upstream that reports only part of a set (no remaining count) must not make the
    client see two limits or two resets."""
    values = {"limit": "9999", "reset": "1s"}
    up = Upstream(headers=[(f"x-ratelimit-{p}-requests".encode(), values[p].encode())
                           for p in sent])
    app = GuardMiddleware(up, policy(tmp_path, QUOTA))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat())
    for part in ("limit", "remaining", "reset"):
        only(reply, f"x-ratelimit-{part}-requests")
    assert only(reply, "x-ratelimit-remaining-requests") == "4"


async def test_anthropic_rate_headers_merge(tmp_path: Path) -> None:
    theirs = [(b"anthropic-ratelimit-requests-limit", b"4000"),
              (b"anthropic-ratelimit-requests-remaining", b"3999"),
              (b"anthropic-ratelimit-requests-reset", b"2030-01-01T00:00:00Z")]
    app = GuardMiddleware(Upstream(headers=theirs),
                          policy(tmp_path, QUOTA, dialect="anthropic"))
    reply = await call(app, "POST", "/v1/messages", headers=json_headers(ANTHROPIC_KEY),
                       body=b'{"model": "m", "messages": []}')
    assert reply.status == 200
    assert only(reply, "anthropic-ratelimit-requests-limit") == "5"
    assert only(reply, "anthropic-ratelimit-requests-remaining") == "4"
    assert only(reply, "anthropic-ratelimit-requests-reset") != "2030-01-01T00:00:00Z"


# -- 9. x-request-id, and what the inner app can reach ---------------------------------


async def test_request_id_on_every_answer_and_given_ids_kept(tmp_path: Path) -> None:
    up = Upstream(headers=[(b"x-request-id", b"the-upstream-own-id")])
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: requests
    when: {path: /v1/chat/completions}
    quota: 1/minute
"""))
    given = "c" * 128
    ok = await call(app, "POST", "/v1/chat/completions",
                    headers={**json_headers(), "x-request-id": given}, body=chat())
    assert ok.status == 200 and only(ok, "x-request-id") == given
    assert up.seen[0].headers["x-request-id"] == given
    assert [k for k, _ in up.seen[0].scope["headers"]].count(b"x-request-id") == 1
    answers = {
        "denied": await call(app, "POST", "/v1/chat/completions",
                             headers={**json_headers(), "x-request-id": "r-denied"}, body=chat()),
        "no key": await call(app, "POST", "/v1/chat/completions",
                             headers={"x-request-id": "r-nokey"}, body=chat()),
        "bad json": await call(app, "POST", "/v1/chat/completions",
                               headers={**json_headers(), "x-request-id": "r-json"}, body=b"{"),
        "bad path": await call(app, "POST", "/v1/%2e%2e/x",
                               headers={**json_headers(), "x-request-id": "r-path"}, body=b"{}"),
    }
    assert {k: (r.status, only(r, "x-request-id")) for k, r in answers.items()} == {
        "denied": (429, "r-denied"), "no key": (401, "r-nokey"), "bad json": (400, "r-json"),
        "bad path": (400, "r-path")}
    fresh = [await call(app, "GET", "/v1/models", headers=OPENAI_KEY) for _ in range(2)]
    assert [r.status for r in fresh] == [200, 200]
    ids = [only(r, "x-request-id") for r in fresh]
    assert ids[0] != ids[1] and all(ids)
    assert [s.headers["x-request-id"] for s in up.seen[1:]] == ids


async def test_the_inner_app_never_sees_the_client_key(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    secret = "key-alice"
    for headers in ({"authorization": f"Bearer {secret}"},
                    {"authorization": f"Bearer {secret}", "x-api-key": secret,
                     "api-key": secret, "x-goog-api-key": secret,
                     "proxy-authorization": f"Basic {secret}"},
                    {"api-key": secret}):
        reply = await call(app, "POST", "/v1/chat/completions",
                           headers={**headers, "content-type": "application/json",
                                    "x-request-id": "rid-1"}, body=chat())
        assert reply.status == 200
        seen = up.seen[-1]
        info = seen.scope["state"]["guardproxy"]
        assert isinstance(info, RequestInfo)
        assert info.account is not None and info.account.id == "alice"
        assert (info.request_id, info.model) == ("rid-1", "m")
        assert secret not in repr(seen.scope), "the key reached the inner app"


# -- 10. unguarded paths and WebSockets -------------------------------------------------

UNGUARDED = "unguarded: [/health, /docs]\n"


async def test_unguarded_paths_skip_the_guards_and_only_those(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, top=UNGUARDED))
    health = await call(app, "GET", "/health")
    docs = await call(app, "GET", "/docs/")
    assert (health.status, docs.status) == (200, 200)
    assert [s.path for s in up.seen] == ["/health", "/docs"]
    sneaky = await call(app, "POST", "/health/../v1/chat/completions",
                        headers={"content-type": "application/json"}, body=chat())
    assert sneaky.status == 401 and len(up.seen) == 2
    keyed = await call(app, "POST", "/docs/../v1/chat/completions", headers=json_headers(),
                       body=chat())
    assert keyed.status == 200
    assert up.seen[-1].path == "/v1/chat/completions"
    assert (await window(app)).used == PROMPT_TOKENS + 100


async def websocket(app: Any, path: str) -> list[Message]:
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "scheme": "ws", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"authorization", b"Bearer key-alice")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080), "subprotocols": []}
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_websockets_are_refused_unless_unguarded(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, top=UNGUARDED))
    for path in ("/v1/realtime", "/health/../v1/realtime", "/v1/%2e%2e/health"):
        assert await websocket(app, path) == [{"type": "websocket.close", "code": 1008}]
    assert up.seen == []
    sent = await websocket(app, "/health")
    assert sent[0] == {"type": "websocket.accept"}
    assert [s.path for s in up.seen] == ["/health"]


# -- streams ---------------------------------------------------------------------------


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


@dataclass
class StreamingUpstream:
    """An SSE chat upstream: ``chunks`` deltas of ``text``, ``delay`` seconds apart, then
    (``then``) the usage chunk if asked for and ``[DONE]``, or an ``UpstreamError``
    ("break"), or a plain exception ("crash"). ``before`` fails before the response
    starts ("break", "crash") or returns without sending anything ("silent").
    ``during(i)`` runs after chunk i. A request without ``stream`` gets a JSON answer."""

    chunks: int = 3
    text: str = "abcd"
    delay: float = 0.0
    then: str = "done"
    before: str = ""
    completion_tokens: int = 2
    during: Callable[[int], Awaitable[None]] | None = None
    seen: list[Any] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        self.seen.append(request)
        if not request.get("stream"):
            out = json.dumps({"usage": {"prompt_tokens": PROMPT_TOKENS,
                                        "completion_tokens": 1}}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": out})
            return
        if self.before == "break":
            raise UpstreamError("upstream unreachable")
        if self.before == "crash":
            raise RuntimeError("the inner app has a bug")
        if self.before == "silent":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(self.chunks):
            chunk = {"choices": [{"index": 0, "delta": {"content": self.text}}]}
            await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})
            if self.during is not None:
                await self.during(i)
            if self.delay:
                await asyncio.sleep(self.delay)
        if self.then == "break":
            raise UpstreamError("upstream reset mid-stream")
        if self.then == "crash":
            raise RuntimeError("the inner app has a bug")
        final = sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            final += sse({"choices": [], "usage": {
                "prompt_tokens": PROMPT_TOKENS, "completion_tokens": self.completion_tokens,
                "total_tokens": PROMPT_TOKENS + self.completion_tokens}})
        await send({"type": "http.response.body", "body": final + sse(b"[DONE]")})


async def settled(app: GuardMiddleware, key: str = "account=alice") -> WindowState:
    """The budget once nothing is reserved any more: the server settles after the last
    byte left, so the client may read it first (a wait, not a timed assertion)."""
    deadline = time.monotonic() + 10
    while True:
        state = await window(app, key=key)
        if state.reserved == 0 or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.02)


STREAM_REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                  "stream": True, "max_tokens": 1000}


async def stream(url: str, request: dict[str, Any] = STREAM_REQUEST) -> tuple[int, bytes, str]:
    """(status, body, error): error names the transport error if the body was cut."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        try:
            async with c.stream("POST", "/v1/chat/completions", json=request,
                                headers=OPENAI_KEY) as r:
                body = b"".join([part async for part in r.aiter_raw()])
                return r.status_code, body, ""
        except httpx.HTTPError as exc:
            return 0, b"", type(exc).__name__


@pytest.mark.parametrize(("stream_usage", "asked", "hidden"), [
    ("", False, True), ("", True, False), ("stream_usage: never", False, None)])
async def test_stream_usage_chunk_is_injected_and_hidden(tmp_path: Path, stream_usage: str,
                                                         asked: bool, hidden: bool | None) -> None:
    up = StreamingUpstream(completion_tokens=7)
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, upstream=stream_usage))
    request = {**STREAM_REQUEST, **({"stream_options": {"include_usage": True}} if asked
                                    else {})}
    with running_server(app, lifespan="off") as url:
        status, body, error = await stream(url, request)
        state = await settled(app)
    assert (status, error) == (200, "")
    (seen,) = up.seen
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    if hidden is None:  # never injected: the usage is estimated from the text
        assert "stream_options" not in seen
        assert b'"usage"' not in body
        assert state.used == estimate_prompt(request) + math.ceil(3 * 4 / 2)
    else:
        assert seen["stream_options"] == {"include_usage": True}
        assert (b'"usage"' in body) is not hidden
        assert state.used == PROMPT_TOKENS + 7
    assert len(events) == 3 + 1 + (0 if hidden in (True, None) else 1) + 1


# -- 12. endings -----------------------------------------------------------------------


def streamed_charge(request: dict[str, Any], chunks: int, text: str = "abcd") -> int:
    """What a budget charges for ``chunks`` deltas of ``text`` without reported usage."""
    return estimate_prompt(request) + math.ceil(chunks * len(text.encode()) / 2)


async def test_upstream_breaking_off_mid_stream_is_charged_what_was_streamed(
        tmp_path: Path) -> None:
    up = StreamingUpstream(chunks=3, then="break")
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    with running_server(app, lifespan="off") as url:
        status, body, error = await stream(url)
        state = await settled(app)
    assert (status, error) == (200, ""), "a cleanly ended response, no 500"
    assert body.count(b'"content"') == 3
    assert (state.used, state.reserved) == (streamed_charge(STREAM_REQUEST, 3), 0)


async def test_upstream_failing_before_the_response_is_a_502_charged_nothing(
        tmp_path: Path) -> None:
    up = StreamingUpstream(before="break")
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    with running_server(app, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            r = await c.post("/v1/chat/completions", json=STREAM_REQUEST, headers=OPENAI_KEY)
        state = await settled(app)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "server_error" and "127.0.0.1" not in r.text
    assert r.headers["x-request-id"]
    assert (state.used, state.reserved) == (0, 0)


async def test_inner_app_returning_without_an_answer_releases_the_reservation(
        tmp_path: Path) -> None:
    up = StreamingUpstream(before="silent")
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=json.dumps(STREAM_REQUEST).encode())
    assert reply.messages == []
    assert ((await window(app)).used, (await window(app)).reserved) == (0, 0)


async def test_inner_app_crashing_mid_stream_is_charged_what_was_streamed(
        tmp_path: Path) -> None:
    """An exception that is not an UpstreamError, after half the answer went out (a bug
    in the embedding app, a generator that raised): the client got that half, so the
    budget is charged for it, and the client's response ends cleanly."""
    up = StreamingUpstream(chunks=3, then="crash")
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    with running_server(app, lifespan="off") as url:
        status, _, error = await stream(url)
        state = await settled(app)
    assert (state.used, state.reserved) == (streamed_charge(STREAM_REQUEST, 3), 0)
    assert (status, error) == (200, "")


async def test_inner_app_crashing_before_the_response_is_a_dialect_error(
        tmp_path: Path) -> None:
    up = StreamingUpstream(before="crash")
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    try:
        reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                           body=json.dumps(STREAM_REQUEST).encode())
    except RuntimeError:
        reply = None
    state = await window(app)
    assert (state.used, state.reserved) == (0, 0)
    assert reply is not None, "the exception escaped: the server answers a bare 500"
    assert reply.status in (500, 502) and reply.json()["error"]["type"] == "server_error"
    assert b"Traceback" not in reply.body and b"bug" not in reply.body


async def test_client_leaving_mid_stream_is_charged_the_whole_reservation(
        tmp_path: Path) -> None:
    """ASGI 2.4 servers (hypercorn, granian; starlette turns it into ClientDisconnect)
    raise OSError from ``send`` once the client is gone. The upstream may have generated
    the whole answer, so the reservation is charged, as the README promises."""
    up = StreamingUpstream(chunks=5)
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    bodies = 0

    async def gone_after_two_chunks(message: Message) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies > 2:
                raise OSError("client disconnected")

    request = {**STREAM_REQUEST, "stream_options": {"include_usage": True}}
    with contextlib.suppress(OSError):  # the server's own error: it may propagate
        await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                   body=json.dumps(request).encode(), send=gone_after_two_chunks)
    state = await window(app)
    assert state.reserved == 0
    assert state.used == estimate_prompt(request) + 1000, "charged the whole reservation"
