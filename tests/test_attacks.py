"""Holes found by an adversarial review: each test reproduces one way a hostile client
(or a misbehaving upstream) gets tokens uncharged, crashes the proxy, or learns the
upstream's address. Each fails on the code it was written against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from guardproxy import GuardMiddleware
from guardproxy.app import create_app
from tests.conftest import write_policy
from tests.servers import running_server
from tests.test_request_plan import BUDGET, call, chat, json_headers, policy, window

HUGE = int("1" * 400)  # a valid JSON integer too large for a float
LARGE_BUDGET = """
rules:
  - name: tokens
    budget: 1000000000/day
    per: account
"""


async def _read(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


def answering(make: Any, seen: list[Any] | None = None) -> Any:
    """An upstream that answers ``make(request JSON or None, scope)`` -> (status,
    content-type, body) and records the JSON requests it got in ``seen``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        raw = await _read(receive)
        try:
            request = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            request = None
        if seen is not None:
            seen.append(request)
        status, ctype, body = make(request, scope)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})

    return app


# -- (d) a 500 from one small request ----------------------------------------------------

async def test_an_integer_too_large_for_a_float_is_a_400_not_a_crash(tmp_path: Path) -> None:
    """``"n": 111…1`` (400 digits) is valid JSON; the budget's cost arithmetic turns it
    into a float and raises OverflowError: an unhandled exception (uvicorn's bare 500)."""
    seen: list[Any] = []
    app = GuardMiddleware(answering(lambda r, s: (200, b"application/json", b"{}"), seen),
                          policy(tmp_path, BUDGET))
    for field in ("n", "max_tokens"):
        reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                           body=chat(**{field: HUGE}))
        assert reply.status == 400, (field, reply.status, reply.body)
    assert seen == []


# -- (a) tokens generated and delivered, not charged -----------------------------------

def _echoing_response(request: Any, scope: Scope) -> tuple[int, bytes, bytes]:
    """The Responses API (OpenAI, vLLM) echoes the request's ``tools`` in its answer."""
    tools = request.get("tools") if isinstance(request, dict) else None
    out = {"object": "response", "status": "completed", "tools": tools,
           "output": [{"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "word " * 4000}]}],
           "usage": {"input_tokens": 10, "output_tokens": 4000}}
    return 200, b"application/json", json.dumps(out).encode()


async def test_a_deep_echoed_schema_cannot_blind_the_usage_meter(tmp_path: Path) -> None:
    """A tools schema nested just under the depth the request parser accepts is echoed a
    few levels deeper in the answer: parsing the answer raises RecursionError, the usage
    stage is dropped as "failed", and the 4,000 generated tokens are never charged
    (only the prompt estimate is). The canary stage is dropped the same way."""
    app = GuardMiddleware(answering(_echoing_response), policy(tmp_path, LARGE_BUDGET))
    for depth in (*range(60, 70), *range(600, 1200, 7)):
        nested = "[" * depth + "]" * depth
        body = ('{"model":"m","input":"hi","max_output_tokens":4000,"tools":[{"type":'
                '"function","name":"f","parameters":{"x":' + nested + '}}]}').encode()
        before = (await window(app)).used
        reply = await call(app, "POST", "/v1/responses", headers=json_headers(), body=body)
        if reply.status != 200:
            assert reply.status == 400, reply.body  # "nested too deeply"
            break
        charged = (await window(app)).used - before
        assert charged >= 4000, f"depth {depth}: 4,000 tokens delivered, {charged} charged"
    # every depth refused (the request parser caps nesting) closes the hole as well


async def test_json_usage_of_zero_beside_text_is_not_taken_at_its_word(
        tmp_path: Path) -> None:
    """A non-streamed answer with ``completion_tokens: 0`` beside 10 kB of text is
    charged 0 output tokens (streams estimate the text in that case; JSON does not)."""
    text = "word " * 2000
    body = json.dumps({"object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": text}}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 0}}).encode()
    app = GuardMiddleware(answering(lambda r, s: (200, b"application/json", body)),
                          policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(max_tokens=100))
    assert reply.status == 200
    assert (await window(app)).used >= 100, "10 kB of text was charged as 0 tokens"


def _llama_cpp(request: Any, scope: Scope) -> tuple[int, bytes, bytes]:
    """llama.cpp's server: ``n_predict`` wins over ``max_tokens`` (params_from_json_cmpl:
    ``json_value(data, "n_predict", json_value(data, "max_tokens", …))``)."""
    cap = request.get("n_predict", request.get("max_tokens", 16))
    out = {"object": "chat.completion",
           "choices": [{"index": 0, "message": {"role": "assistant",
                                                "content": "w " * cap}}],
           "usage": {"prompt_tokens": 5, "completion_tokens": cap}}
    return 200, b"application/json", json.dumps(out).encode()


async def test_a_cap_field_the_upstream_prefers_is_capped_too(tmp_path: Path) -> None:
    """The reservation covers ``max_tokens`` (16) while llama.cpp generates ``n_predict``
    (50,000): one request overdraws a 100,000/day budget by half, and N concurrent ones
    all pass the reservation that was meant to stop them."""
    seen: list[Any] = []
    app = GuardMiddleware(answering(_llama_cpp, seen), policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(max_tokens=16, n_predict=50_000))
    if reply.status == 200:
        assert seen[0].get("n_predict", 0) <= 16, f"upstream was told {seen[0]}"


def _background(request: Any, scope: Scope) -> tuple[int, bytes, bytes]:
    """OpenAI's Responses API with ``background: true``: the POST answers at once
    (queued, no output, no usage); the answer is fetched later with GET."""
    text = "word " * 4000
    if scope["method"] == "POST":
        out: dict[str, Any] = {"id": "resp_1", "object": "response", "status": "queued",
                               "background": True, "output": [], "usage": None}
    else:
        out = {"id": "resp_1", "object": "response", "status": "completed",
               "output": [{"type": "message", "content": [{"type": "output_text",
                                                            "text": text}]}],
               "usage": {"input_tokens": 10, "output_tokens": 4000}}
    return 200, b"application/json", json.dumps(out).encode()


async def test_background_responses_are_not_generated_for_free(tmp_path: Path) -> None:
    """``background: true`` moves the generation out of the metered POST; the GET that
    fetches it is never metered (no body). 4,000 tokens delivered, ~0 charged."""
    app = GuardMiddleware(answering(_background), policy(tmp_path, BUDGET))
    post = await call(app, "POST", "/v1/responses", headers=json_headers(),
                      body=json.dumps({"model": "m", "input": "hi", "background": True,
                                       "max_output_tokens": 4000}).encode())
    if post.status >= 400:
        return  # refused: fine
    got = await call(app, "GET", "/v1/responses/resp_1",
                     headers={"authorization": "Bearer key-alice"})
    assert got.status == 200 and b"word" in got.body
    assert (await window(app)).used >= 4000, "a background answer was delivered uncharged"


# -- (d) the upstream's address in a response ------------------------------------------

async def test_an_upstream_redirect_does_not_name_the_upstream(tmp_path: Path) -> None:
    """A FastAPI/Starlette upstream redirects a missing trailing slash (307) with an
    absolute ``Location`` built from the Host the proxy sent: the upstream's address."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def things(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    upstream = Starlette(routes=[Route("/v1/things/", things)])
    with running_server(upstream) as base:
        proxy = create_app(write_policy(tmp_path, "rules: []\n", upstream=base))
        with running_server(proxy) as front:
            async with httpx.AsyncClient() as client:
                reply = await client.get(front + "/v1/things",
                                         headers={"authorization": "Bearer key-alice"})
    assert reply.status_code == 307
    address = base.removeprefix("http://")
    leaked = {k: v for k, v in reply.headers.items() if address in v}
    assert not leaked and address not in reply.text, leaked
