"""What the proxy enforces is what the upstream executes: the request side.

Every test here is differential. The inner app (``Upstream``) plays a lenient model
server (vLLM, a FastAPI app): it parses the body as JSON whatever the content type
(Python's ``json``: the last duplicate key wins, NaN is a number), coerces ``"4"`` to 4
as pydantic's lax mode does, and honours ``n``, ``best_of``, several prompts and the
output cap. It records exactly the path, headers, state and body it executed on, so a
test can compare what the guards counted with what was generated.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from starlette.types import Message, Receive, Scope, Send

from guardproxy import GuardMiddleware
from guardproxy.state.budgets import WindowState
from guardproxy.tokens import estimate_prompt
from tests.conftest import write_policy

UPSTREAM_ADDRESS = "127.0.0.1:9"   # write_policy's upstream URL: must never be named
PROMPT_TOKENS = 10                 # what Upstream reports for every prompt
BUDGET = """
rules:
  - name: tokens
    budget: 100000/day
    per: account
    default_max_tokens: 100
"""
OPENAI_KEY = {"authorization": "Bearer key-alice"}
ANTHROPIC_KEY = {"x-api-key": "key-alice"}


# -- the lenient upstream ------------------------------------------------------------


def lax_int(value: Any, default: int) -> int:
    """pydantic's lax int: "4", 4.0, 1e3 and true are all numbers to it."""
    if value is None:
        return default
    if isinstance(value, str):
        return int(float(value))
    return int(value)


def lax_bool(value: Any) -> bool:
    return value in (True, 1, "true", "True", "1", "yes", "on")


@dataclass
class Seen:
    """One request as the inner app executed it."""

    scope: dict[str, Any]
    body: bytes
    json: Any

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @property
    def raw_path(self) -> bytes:
        return bytes(self.scope["raw_path"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}


@dataclass
class Upstream:
    """A lenient model server that records what it executed.

    Answers JSON with ``usage``: prompt ``PROMPT_TOKENS``, completion = the cap it read
    (``max_completion_tokens``, else ``max_tokens``/``max_output_tokens``, else 1,000)
    * completions (max(n, best_of) * prompts) — all of it generated, as far as a budget
    can tell. ``during`` runs while the request is in flight (to read the stores);
    ``headers`` are added to every answer."""

    during: Callable[[], Awaitable[Any]] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    probes: list[Any] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            self.seen.append(Seen(dict(scope), b"", None))
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            request: Any = json.loads(body) if body else None
        except ValueError:
            request = None
        self.seen.append(Seen(dict(scope), body, request))
        if self.during is not None:
            self.probes.append(await self.during())
        if self.delay:
            await asyncio.sleep(self.delay)
        usage = generated(request, scope["path"])
        out = json.dumps({"object": "chat.completion", "usage": usage}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()), *self.headers]})
        await send({"type": "http.response.body", "body": out})


def generated(request: Any, path: str = "/v1/chat/completions") -> dict[str, int]:
    """The usage a lenient server reports for ``request`` on ``path`` (OpenAI and
    Anthropic keys); embeddings generate nothing."""
    if not isinstance(request, dict) or path.endswith("/embeddings"):
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 0}
    cap = request.get("max_completion_tokens")
    if cap is None:
        cap = request.get("max_tokens", request.get("max_output_tokens"))
    copies = max(lax_int(request.get("n"), 1), lax_int(request.get("best_of"), 1))
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        copies *= len(prompt)
    completion = lax_int(cap, 1000) * copies
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
            "input_tokens": PROMPT_TOKENS, "output_tokens": completion}


# -- driving the middleware directly (exact raw paths, exact headers) -----------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message]

    def header(self, name: str) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k.decode().lower() == name]

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: Any, method: str, raw_path: str | bytes, *,
               headers: dict[str, str] | Iterable[tuple[str, str]] = (),
               body: bytes = b"", client: tuple[str, int] = ("127.0.0.1", 5000),
               send: Callable[[Message], Awaitable[None]] | None = None) -> Reply:
    """One HTTP request through ``app`` as an ASGI server would deliver it: ``raw_path``
    verbatim (no client-side normalisation), ``path`` its percent-decoding."""
    raw = raw_path.encode("latin-1") if isinstance(raw_path, str) else raw_path
    pairs = headers.items() if isinstance(headers, dict) else headers
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": method, "scheme": "http",
             "path": unquote(raw.decode("latin-1")), "raw_path": raw, "query_string": b"",
             "root_path": "", "client": client, "server": ("127.0.0.1", 8080),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
             "state": {}}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)
        if send is not None:
            await send(message)

    await app(scope, receive, record)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    return Reply(start["status"] if start else 0, list(start["headers"]) if start else [],
                 b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
                 sent)


def policy(tmp: Path, rules: str, *, dialect: str = "openai", upstream: str = "",
           top: str = "", state: str = "memory://", key_prefix: str = "guardproxy") -> Path:
    """A policy in a fresh folder under ``tmp``; ``upstream`` adds keys to upstream:,
    ``top`` adds top-level keys (``unguarded:``)."""
    folder = tmp / f"p{len(list(tmp.iterdir()))}"
    folder.mkdir()
    path = write_policy(folder, top + rules, dialect=dialect, state=state,
                        key_prefix=key_prefix)
    if upstream:
        text = path.read_text()
        assert "connect_timeout: 2s}" in text
        path.write_text(text.replace("connect_timeout: 2s}", f"connect_timeout: 2s, {upstream}}}"))
    return path


async def window(app: GuardMiddleware, rule: str = "tokens",
                 key: str = "account=alice") -> WindowState:
    """The first window of budget ``rule`` for counter ``key``."""
    guard = next(g for g in app.pipeline.guards if g.rule.name == rule)
    states = await app.pipeline.state.budgets.usage(f"{rule}|{key}",
                                                    guard.rule.settings.windows)
    return states[0]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       **fields}).encode()


def json_headers(key: dict[str, str] = OPENAI_KEY) -> dict[str, str]:
    return {**key, "content-type": "application/json"}


def assert_refused(reply: Reply, dialect: str, *names: str) -> None:
    """A 400 in the dialect's own error JSON that names each of ``names``."""
    assert reply.status == 400, reply.body
    body = reply.json()
    if dialect == "openai":
        error = body["error"]
        assert error["type"] == "invalid_request_error"
    else:
        assert body["type"] == "error"
        error = body["error"]
        assert error["type"] == "invalid_request_error"
    for name in names:
        assert name in error["message"], error["message"]
    assert b"Traceback" not in reply.body and UPSTREAM_ADDRESS.encode() not in reply.body


# -- 1. the body is read on generation endpoints whatever the content type -------------


@pytest.mark.parametrize("ctype", ["Application/JSON", "text/plain", None,
                                   "application/json; charset=utf-8",
                                   "application/x-www-form-urlencoded"])
async def test_generation_body_is_guarded_whatever_the_content_type(
        tmp_path: Path, ctype: str | None) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    headers = {**OPENAI_KEY, **({"content-type": ctype} if ctype else {})}
    reply = await call(app, "POST", "/v1/chat/completions", headers=headers, body=chat())
    assert reply.status == 200, reply.body
    (seen,) = up.seen
    assert seen.json["max_tokens"] == 100, "the cap reserved for reaches the upstream"
    assert int(seen.headers["content-length"]) == len(seen.body)
    # read as JSON here, so labelled JSON there: a stricter app reads it the same way
    labels = [v for k, v in seen.scope["headers"] if k == b"content-type"]
    assert labels == [b"application/json"]
    state = await window(app)
    assert (state.used, state.reserved) == (PROMPT_TOKENS + 100, 0)


EMBEDDING_RULES = """
rules:
  - name: embedding-requests
    when: {model: emb-*}
    quota: 1/minute
  - name: tokens
    budget: 100000/day
    when: {path: /v1/embeddings}
"""


async def test_json_body_without_content_type_is_guarded_off_generation_paths(
        tmp_path: Path) -> None:
    """FastAPI (vLLM's server) parses a body as JSON when the request has no content
    type at all, so a rule keyed on the body (the model, the prompt's tokens) must read
    it then too, on every path: /v1/embeddings is no generation endpoint."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, EMBEDDING_RULES))
    body = b'{"model": "emb-large", "input": "hello there"}'
    replies = [await call(app, "POST", "/v1/embeddings", headers=OPENAI_KEY, body=body)
               for _ in range(2)]
    assert up.seen[0].json["model"] == "emb-large", "the upstream read the body as JSON"
    assert [r.status for r in replies] == [200, 429], "the model rule applies"
    assert (await window(app)).used == PROMPT_TOKENS, "the budget counted the call"


@pytest.mark.parametrize("ctype", [None, "text/plain"])
@pytest.mark.parametrize("body", [
    pytest.param(b'{"model": "emb-large", "input": "hi", "input": "hello"}', id="duplicate"),
    pytest.param(b'{"model": "emb-large", "input": "hi", "dimensions": NaN}', id="NaN"),
    pytest.param(b'\xef\xbb\xbf{"model": "emb-large", "input": "hi"}', id="BOM"),
    pytest.param('{"model": "emb-large", "input": "hi"}'.encode("utf-16"), id="UTF-16"),
])
async def test_unlabelled_bodies_that_a_lenient_parser_reads_are_not_passed_unguarded(
        tmp_path: Path, ctype: str | None, body: bytes) -> None:
    """An unlabelled body the strict parser refuses may pass through unread only if no
    JSON parser reads it: Python's ``json.loads`` (Starlette's ``request.json()``, so
    FastAPI and vLLM) takes duplicate keys, NaN, a BOM and UTF-16. Either the guards
    apply or the request is refused."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, EMBEDDING_RULES))
    headers = {**OPENAI_KEY, **({"content-type": ctype} if ctype else {})}
    replies = [await call(app, "POST", "/v1/embeddings", headers=headers, body=body)
               for _ in range(2)]
    statuses = [r.status for r in replies]
    if statuses == [400, 400]:
        assert up.seen == []
        assert_refused(replies[0], "openai")
    else:
        assert statuses == [200, 429], "the model rule applies to what the upstream read"


async def test_a_body_on_a_bodiless_method_is_not_forwarded_unguarded(tmp_path: Path) -> None:
    """A GET (or DELETE) that carries a body on a generation path: either it is read and
    guarded like a POST, or refused; never forwarded with the guards blind to it."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    for method in ("GET", "DELETE"):
        body = chat(max_tokens=5000)
        reply = await call(app, method, "/v1/chat/completions", body=body, headers={
            **json_headers(), "content-length": str(len(body))})
        if reply.status == 200 and up.seen[-1].body:
            assert up.seen[-1].json["max_tokens"] == 5000
            assert (await window(app)).used > 0, f"{method}: executed, never charged"
        elif reply.status != 200:
            assert 400 <= reply.status < 500


# -- 2. field types a lenient upstream reads otherwise: refused, never charged --------

OPENAI_BAD = [
    ('"n": "4"', "n"), ('"n": 4.0', "n"), ('"n": true', "n"), ('"n": 0', "n"),
    ('"best_of": "2"', "best_of"), ('"max_tokens": "100"', "max_tokens"),
    ('"max_tokens": 1e3', "max_tokens"), ('"max_tokens": 100.0', "max_tokens"),
    ('"max_tokens": -1', "max_tokens"), ('"max_completion_tokens": "50"',
                                         "max_completion_tokens"),
    ('"stream": "true"', "stream"), ('"stream": 1', "stream"),
    ('"stream": true, "stream_options": {"include_usage": "false"}', "include_usage"),
    ('"stream_options": "yes"', "stream_options"),
    ('"logprobs": "true"', "logprobs"), ('"top_logprobs": "0"', "top_logprobs"),
    ('"max_tokens": 10, "max_completion_tokens": 20',
     "'max_tokens' and 'max_completion_tokens'"),
]


@pytest.mark.parametrize(("fields", "name"), OPENAI_BAD)
async def test_openai_fields_of_the_wrong_type_are_refused(tmp_path: Path, fields: str,
                                                           name: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    body = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
            + fields + "}").encode()
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(), body=body)
    assert_refused(reply, "openai", name)
    assert up.seen == []
    state = await window(app)
    assert (state.used, state.reserved) == (0, 0)


@pytest.mark.parametrize(("path", "fields", "name"), [
    ("/v1/responses", '"max_output_tokens": "100"', "max_output_tokens"),
    ("/v1/responses", '"max_output_tokens": 1e2', "max_output_tokens"),
    ("/v1/completions", '"n": "2"', "n"), ("/v1/completions", '"best_of": 2.0', "best_of"),
    ("/v1/completions", '"max_tokens": "16"', "max_tokens"),
    ("/v1/completions", '"logprobs": "5"', "logprobs"),
])
async def test_other_openai_endpoints_refuse_wrong_types(tmp_path: Path, path: str,
                                                         fields: str, name: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    body = ('{"model": "m", "prompt": "hi", "input": "hi", ' + fields + "}").encode()
    reply = await call(app, "POST", path, headers=json_headers(), body=body)
    assert_refused(reply, "openai", name)
    assert up.seen == [] and (await window(app)).used == 0


@pytest.mark.parametrize(("body", "name"), [
    (b'{"messages": []}', "model"), (b'{"model": 5, "messages": []}', "model"),
    (b'{"model": "", "messages": []}', "model"), (b'{"model": null, "messages": []}', "model"),
])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_model_is_required_and_a_string(tmp_path: Path, body: bytes, name: str,
                                              dialect: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, dialect=dialect))
    path, key = ("/v1/chat/completions", OPENAI_KEY) if dialect == "openai" \
        else ("/v1/messages", ANTHROPIC_KEY)
    reply = await call(app, "POST", path, headers=json_headers(key), body=body)
    assert_refused(reply, dialect, name)
    assert up.seen == []
    assert (await window(app)).used == 0


@pytest.mark.parametrize(("fields", "name"), [
    ('"max_tokens": "100"', "max_tokens"), ('"max_tokens": 1e3', "max_tokens"),
    ('"max_tokens": true', "max_tokens"), ('"stream": "true"', "stream"),
])
async def test_anthropic_fields_of_the_wrong_type_are_refused(tmp_path: Path, fields: str,
                                                              name: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, dialect="anthropic"))
    body = ('{"model": "m", "messages": [], ' + fields + "}").encode()
    reply = await call(app, "POST", "/v1/messages", headers=json_headers(ANTHROPIC_KEY),
                       body=body)
    assert_refused(reply, "anthropic", name)
    assert up.seen == [] and (await window(app)).used == 0


async def test_both_cap_fields_equal_is_fine(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(max_tokens=70, max_completion_tokens=70))
    assert reply.status == 200
    (seen,) = up.seen
    assert (seen.json["max_tokens"], seen.json["max_completion_tokens"]) == (70, 70)
    assert (await window(app)).used == PROMPT_TOKENS + 70


QUOTA_BIG = """
rules:
  - name: big-model
    when: {model: gpt-big}
    quota: 1/minute
"""


async def test_azure_deployment_is_the_model_when_the_body_names_none(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, QUOTA_BIG))
    path = "/openai/deployments/gpt-big/chat/completions"
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    first = await call(app, "POST", path, headers=json_headers(), body=body)
    second = await call(app, "POST", path, headers=json_headers(), body=body)
    assert (first.status, second.status) == (200, 429)
    assert "big-model" in second.json()["error"]["message"]


async def test_azure_deployment_wins_over_the_body_model(tmp_path: Path) -> None:
    """Azure runs the deployment named in the path and ignores the body's ``model``: a
    rule for the deployment's model must not be walked around by naming another one."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, QUOTA_BIG))
    path = "/openai/deployments/gpt-big/chat/completions"
    replies = [await call(app, "POST", path, headers=json_headers(),
                          body=chat(model=f"gpt-small-{i}")) for i in range(2)]
    statuses = [r.status for r in replies]
    assert statuses in ([200, 429], [400, 400]), statuses


async def test_legacy_prompts_times_n_are_all_reserved(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    up.during = lambda: window(app)
    request = {"model": "m", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 100}
    reply = await call(app, "POST", "/v1/completions", headers=json_headers(),
                       body=json.dumps(request).encode())
    assert reply.status == 200
    (held,) = up.probes
    assert held.reserved == estimate_prompt(request) + 6 * 100
    assert (await window(app)).used == PROMPT_TOKENS + 6 * 100


@pytest.mark.parametrize("on_exhausted", ["reject", "clamp"])
async def test_concurrent_n_requests_never_reserve_past_the_budget(
        tmp_path: Path, on_exhausted: str) -> None:
    """The issue's example: 5,000 tokens, 4 concurrent requests with n=4 and max_tokens
    1,500. What the upstream generates must fit in the budget."""
    up = Upstream(delay=0.05)
    app = GuardMiddleware(up, policy(tmp_path, f"""
rules:
  - name: tokens
    budget: 5000/day
    on_exhausted: {on_exhausted}
    min_tokens: 16
"""))
    up.during = lambda: window(app)
    replies = await asyncio.gather(*[
        call(app, "POST", "/v1/chat/completions", headers=json_headers(),
             body=chat(n=4, max_tokens=1500)) for _ in range(4)])
    ok = [r for r in replies if r.status == 200]
    assert all(r.status == 429 for r in replies if r.status != 200)
    assert len(ok) <= 1
    assert all(probe.reserved <= 5000 for probe in up.probes)
    generated_total = sum(generated(s.json)["completion_tokens"] for s in up.seen)
    assert generated_total <= 5000
    state = await window(app)
    assert state.reserved == 0 and state.used <= 5000
    if on_exhausted == "reject":
        assert ok == [] and up.seen == []
    else:
        (seen,) = up.seen
        assert seen.json["n"] == 4 and 16 <= seen.json["max_tokens"] <= 1250


# -- 3. the cap field: what is written is what the upstream honours -------------------


@pytest.mark.parametrize(("upstream", "client", "expected"), [
    ("", {}, {"max_tokens": 100}),
    ("cap_field: max_tokens", {}, {"max_tokens": 100}),
    ("cap_field: max_completion_tokens", {}, {"max_completion_tokens": 100}),
    ("cap_field: both", {}, {"max_tokens": 100, "max_completion_tokens": 100}),
    ("", {"max_completion_tokens": 60}, {"max_tokens": 60, "max_completion_tokens": 60}),
    ("cap_field: max_completion_tokens", {"max_tokens": 60},
     {"max_tokens": 60, "max_completion_tokens": 60}),
    ("", {"max_tokens": None}, {"max_tokens": 100}),
])
async def test_cap_fields_written(tmp_path: Path, upstream: str, client: dict[str, Any],
                                  expected: dict[str, int]) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, upstream=upstream))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(**client))
    assert reply.status == 200
    (seen,) = up.seen
    caps = {k: seen.json[k] for k in ("max_tokens", "max_completion_tokens") if k in seen.json}
    assert caps == expected
    assert (await window(app)).used == PROMPT_TOKENS + min(expected.values())


async def test_clamped_cap_is_written_into_every_field(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: tokens
    budget: 1000/day
    on_exhausted: clamp
""", upstream="cap_field: both"))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(max_completion_tokens=5000))
    assert reply.status == 200
    (seen,) = up.seen
    assert seen.json["max_tokens"] == seen.json["max_completion_tokens"] < 1000
    assert (await window(app)).used <= 1000


@pytest.mark.parametrize(("path", "field"), [("/v1/responses", "max_output_tokens"),
                                             ("/v1/completions", "max_tokens")])
async def test_other_endpoints_get_their_own_cap_field(tmp_path: Path, path: str,
                                                       field: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    body = {"model": "m", "input": "hi"} if field == "max_output_tokens" \
        else {"model": "m", "prompt": "hi"}
    reply = await call(app, "POST", path, headers=json_headers(),
                       body=json.dumps(body).encode())
    assert reply.status == 200
    assert up.seen[0].json[field] == 100


@pytest.mark.parametrize(("stream_usage", "injected"), [("", True), ("stream_usage: inject", True),
                                                        ("stream_usage: never", False)])
async def test_stream_usage_injection_follows_the_policy(tmp_path: Path, stream_usage: str,
                                                         injected: bool) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, upstream=stream_usage))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=chat(stream=True))
    assert reply.status == 200
    (seen,) = up.seen
    if injected:
        assert seen.json["stream_options"] == {"include_usage": True}
    else:
        assert "stream_options" not in seen.json


# -- 4. strict JSON: one reading that no upstream can read otherwise ------------------

DEEP = 100_000
BAD_JSON = {
    "duplicate key": b'{"model": "m", "messages": [], "max_tokens": 10, "max_tokens": 100000}',
    "duplicate key, escaped": (b'{"model": "m", "messages": [], "max_tokens": 10, '
                               b'"max\\u005ftokens": 100000}'),
    "nested duplicate": (b'{"model": "m", "messages": [], "stream": true, "stream_options": '
                         b'{"include_usage": false, "include_usage": true}}'),
    "NaN": b'{"model": "m", "messages": [], "temperature": NaN}',
    "Infinity": b'{"model": "m", "messages": [], "temperature": -Infinity}',
    "BOM": b'\xef\xbb\xbf{"model": "m", "messages": []}',
    "UTF-16 with BOM": '{"model": "m", "messages": []}'.encode("utf-16"),
    "UTF-16-LE": '{"model": "m", "messages": []}'.encode("utf-16-le"),
    "UTF-32": '{"model": "m", "messages": []}'.encode("utf-32"),
    "latin-1 byte": b'{"model": "m\xe9", "messages": []}',
    "deep array": b'{"model": "m", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep object": b'{"model": "m", "x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
    "huge integer": b'{"model": "m", "messages": [], "seed": 1' + b"0" * 5000 + b"}",
    "array": b"[]", "string": b'"hi"', "null": b"null", "number": b"1", "empty": b"",
    "trailing garbage": b'{"model": "m", "messages": []} {"max_tokens": 1}',
}


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("case", list(BAD_JSON))
async def test_bodies_read_differently_by_some_parser_are_refused(
        tmp_path: Path, case: str, dialect: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET, dialect=dialect))
    path, key = ("/v1/chat/completions", OPENAI_KEY) if dialect == "openai" \
        else ("/v1/messages", ANTHROPIC_KEY)
    reply = await call(app, "POST", path, headers=json_headers(key), body=BAD_JSON[case])
    assert_refused(reply, dialect)
    assert up.seen == []
    assert (await window(app)).used == 0


async def test_numbers_that_overflow_to_infinity_are_refused(tmp_path: Path) -> None:
    """``1e999`` is Infinity to Python and JavaScript, an error to Go and serde: the
    same as the ``Infinity`` literal, and re-encoded as one when the body is rewritten."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                       body=b'{"model": "m", "messages": [], "temperature": 1e999}')
    assert_refused(reply, "openai")
    assert up.seen == []


@pytest.mark.parametrize("where", ["metadata", "content"])
async def test_nesting_near_the_recursion_limit_never_escapes(tmp_path: Path,
                                                              where: str) -> None:
    """Depths around what ``json`` accepts: the guards walk message content, the body is
    re-encoded (the cap is written). Each answer is a 200 or a dialect 400, never an
    exception out of the middleware."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, BUDGET))
    for depth in range(850, 1010, 3):
        nested = "[" * depth + "]" * depth
        if where == "metadata":
            body = '{"model": "m", "messages": [], "metadata": ' + nested + "}"
        else:
            body = ('{"model": "m", "messages": [{"role": "user", "content": ' + nested
                    + "}]}")
        reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                           body=body.encode())
        assert reply.status in (200, 400), (depth, reply.status)
        if reply.status == 400:
            assert_refused(reply, "openai")


# -- 5. one path for guards and upstream ----------------------------------------------

PATH_RULES = """
rules:
  - name: chat-requests
    when: {path: /v1/chat/completions}
    quota: 1/minute
  - name: tokens
    budget: 100000/day
    default_max_tokens: 100
"""


@pytest.mark.parametrize("raw", ["/x/../v1/chat/completions", "/v1/chat/completions/.",
                                 "/v1//chat/completions", "/v1/chat/completions/",
                                 "//v1/chat/completions", "/v1/./chat/completions",
                                 "/v1/chat/complet%69ons", "/v1/chat/x/../completions"])
async def test_path_variants_are_guarded_and_forwarded_normalised(tmp_path: Path,
                                                                  raw: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, PATH_RULES))
    variant = await call(app, "POST", raw, headers=json_headers(), body=chat())
    canonical = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                           body=chat())
    assert (variant.status, canonical.status) == (200, 429), "one quota for both spellings"
    (seen,) = up.seen
    assert (seen.path, seen.raw_path) == ("/v1/chat/completions", b"/v1/chat/completions")
    assert seen.json["max_tokens"] == 100
    assert (await window(app)).used == PROMPT_TOKENS + 100


async def test_a_query_left_in_raw_path_is_not_part_of_the_path(tmp_path: Path) -> None:
    """Some ASGI servers leave the query in ``raw_path`` (UpstreamApp already splits it
    off): the path the guards match and the inner app routes on is the path alone."""
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, PATH_RULES))
    first = await call(app, "POST", "/v1/chat/completions?api-version=2024-06-01",
                       headers=json_headers(), body=chat())
    second = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                        body=chat())
    assert (first.status, second.status) == (200, 429)
    (seen,) = up.seen
    assert (seen.path, seen.raw_path) == ("/v1/chat/completions", b"/v1/chat/completions")
    assert seen.json["max_tokens"] == 100


async def test_anthropic_dot_segments_are_guarded(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: messages
    when: {path: /v1/messages}
    quota: 1/minute
  - name: tokens
    budget: 100000/day
    default_max_tokens: 100
""", dialect="anthropic"))
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    first = await call(app, "POST", "/x/../v1/messages", headers=json_headers(ANTHROPIC_KEY),
                        body=body)
    second = await call(app, "POST", "/v1/messages/", headers=json_headers(ANTHROPIC_KEY),
                        body=body)
    assert (first.status, second.status) == (200, 429)
    assert second.json()["type"] == "error"
    (seen,) = up.seen
    assert (seen.path, seen.raw_path) == ("/v1/messages", b"/v1/messages")
    assert seen.json["max_tokens"] == 100
    assert (await window(app)).used == PROMPT_TOKENS + 100


@pytest.mark.parametrize(("method", "raw"), [
    ("POST", "/v1/%2e%2e/v1/chat/completions"), ("POST", "/v1/chat/%2E%2E/chat/completions"),
    ("POST", "/v1/chat%2Fcompletions"), ("POST", "/v1/chat%2fcompletions"),
    ("POST", "/v1\\chat\\completions"), ("POST", "/v1/chat%5Ccompletions"),
    ("POST", "/v1/chat/completions%00"), ("OPTIONS", "*"), ("POST", "*"),
    ("POST", f"http://{UPSTREAM_ADDRESS}/v1/chat/completions"),
    ("POST", "https://evil.example/v1/chat/completions"), ("POST", "v1/chat/completions"),
    ("POST", "/../v1/chat/completions"), ("POST", "/v1/chat/completions%0d%0a"),
    ("POST", "/v1/chat/compl%ffetions"),
])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_ambiguous_targets_are_refused(tmp_path: Path, method: str, raw: str,
                                             dialect: str) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, PATH_RULES, dialect=dialect))
    key = OPENAI_KEY if dialect == "openai" else ANTHROPIC_KEY
    reply = await call(app, method, raw, headers=json_headers(key), body=chat())
    assert_refused(reply, dialect)
    assert up.seen == []
    assert reply.header("x-request-id")


# -- 6. per keys a request does not carry: counted under the empty value --------------


async def test_budget_per_account_and_model(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: tokens
    budget: 100000/day
    per: [account, model]
    default_max_tokens: 100
"""))
    for model in ("a", "b", "a"):
        reply = await call(app, "POST", "/v1/chat/completions", headers=json_headers(),
                           body=chat(model=model))
        assert reply.status == 200
    assert (await window(app, key="account=alice|model=a")).used == 2 * (PROMPT_TOKENS + 100)
    assert (await window(app, key="account=alice|model=b")).used == PROMPT_TOKENS + 100


async def test_budget_per_model_on_a_path_without_model_is_not_skipped(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: tokens
    budget: 100000/day
    per: [account, model]
"""))
    reply = await call(app, "POST", "/v1/embeddings", headers=json_headers(),
                       body=b'{"input": "hello there"}')
    assert reply.status == 200
    assert (await window(app, key="account=alice|model=")).used == PROMPT_TOKENS


async def test_header_keyed_rules_count_requests_without_the_header(tmp_path: Path) -> None:
    up = Upstream()
    app = GuardMiddleware(up, policy(tmp_path, """
rules:
  - name: team-requests
    quota: 1/minute
    per: header:x-team
  - name: tokens
    budget: 100000/day
    per: header:x-team
    default_max_tokens: 100
"""))
    statuses = []
    for team in (None, None, "red", "red", ""):
        headers = {**json_headers(), **({"x-team": team} if team is not None else {})}
        reply = await call(app, "POST", "/v1/chat/completions", headers=headers, body=chat())
        statuses.append(reply.status)
    assert statuses == [200, 429, 200, 429, 429]
    assert (await window(app, key="header:x-team=")).used == PROMPT_TOKENS + 100
    assert (await window(app, key="header:x-team=red")).used == PROMPT_TOKENS + 100
