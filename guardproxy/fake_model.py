"""A fake OpenAI + Anthropic model API, for the demo, the tests and the benchmarks.

Deterministic, so that tests can predict what it returns:

- the answer has ``n`` words, one token each: ``n = min(cap, 4096)`` where ``cap`` is the
  request's ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` (16 when
  absent); ``finish_reason`` is ``length`` when the cap was reached;
- prompt tokens = whitespace-separated words of every message's text (plus ``system``,
  ``prompt`` or ``input``) + 3 per message.

Per-request knobs, as headers (so they pass through a proxy): ``x-fake-chunk-delay``
(seconds between stream chunks), ``x-fake-status`` (answer with that status and an error
body in the dialect's shape), ``x-fake-no-usage: 1`` (omit usage), ``x-fake-words: N``
(force N words). Every response echoes what the server saw in ``x-fake-saw-authorization``,
``x-fake-saw-api-key``, ``x-fake-saw-cookie`` and ``x-fake-saw-body-sha256``, and sets a
cookie, so tests can prove what a proxy forwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Prose with words an output canary can mark, so the demo and tests show marks.
_FILLER = [
    "the", "main", "idea", "is", "often", "simple", "and", "usually", "works", "nearly",
    "every", "time", "while", "a", "big", "change", "can", "perhaps", "help", "quickly",
    "toward", "the", "goal", "so", "we", "mostly", "choose", "the", "useful", "path", "and",
    "avoid", "the", "difficult", "one",
]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("text", value.get("content", "")))
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    found = body.get("messages")
    messages: list[Any] = found if isinstance(found, list) else []
    words = sum(len(_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
    words += sum(len(_text(body.get(k)).split()) for k in ("system", "prompt", "input"))
    return words + 3 * len(messages)


def _words(request: Request, body: dict[str, Any]) -> tuple[list[str], bool]:
    forced = request.headers.get("x-fake-words")
    cap = next((body[k] for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                if isinstance(body.get(k), int)), 16)
    n = int(forced) if forced else min(max(cap, 1), 4096)
    messages = body.get("messages") or []
    last = _text(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) \
        else _text(body.get("prompt") or body.get("input"))
    seed = ["Fake", "answer", "to:", *last.split()[:5]]
    # the filler is the same prose, reshuffled per prompt: varied, but deterministic
    rng = random.Random(hashlib.sha256(last.encode()).digest())
    filler: list[str] = []
    while len(seed) + len(filler) < n:
        rng.shuffle(shuffled := list(_FILLER))
        filler += shuffled
    return (seed + filler)[:n], not forced and n >= cap


def _saw(request: Request, raw: bytes) -> dict[str, str]:
    return {"x-fake-saw-authorization": request.headers.get("authorization", "-"),
            "x-fake-saw-api-key": request.headers.get("x-api-key", "-"),
            "x-fake-saw-cookie": request.headers.get("cookie", "-"),
            "x-fake-saw-body-sha256": hashlib.sha256(raw).hexdigest(),
            "set-cookie": "fake=1; Path=/"}


def _error(anthropic: bool, status: int, message: str, saw: dict[str, str]) -> Response:
    body: dict[str, Any] = (
        {"type": "error", "error": {"type": "api_error" if status >= 500 else
                                    "rate_limit_error" if status == 429 else
                                    "invalid_request_error", "message": message}}
        if anthropic else
        {"error": {"message": message, "type": "fake_error", "param": None, "code": None}})
    return JSONResponse(body, status_code=status, headers=saw)


def _sse(events: list[str], delay: float, headers: dict[str, str]) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        for i, event in enumerate(events):
            if delay and i:
                await asyncio.sleep(delay)
            yield event.encode()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _data(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _handle(request: Request, kind: str) -> Response:
    raw = await request.body()
    saw = _saw(request, raw)
    anthropic = kind == "messages"
    try:
        body = json.loads(raw)
        assert isinstance(body, dict)
    except (ValueError, AssertionError):
        return _error(anthropic, 400, "body is not a JSON object", saw)
    if status := request.headers.get("x-fake-status"):
        return _error(anthropic, int(status), f"fake error {status}", saw)
    delay = float(request.headers.get("x-fake-chunk-delay", request.app.state.chunk_delay))
    usage_on = request.headers.get("x-fake-no-usage") != "1"
    model = str(body.get("model", "fake-model"))
    words, truncated = _words(request, body)
    prompt = prompt_tokens(body)
    if kind == "messages":
        return _anthropic(body, words, truncated, prompt, usage_on, delay, model, saw)
    if kind == "embeddings":
        given = body.get("input")
        inputs: list[Any] = given if isinstance(given, list) else [given]
        return JSONResponse({"object": "list", "model": model, "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}, headers=saw)
    usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
             "total_tokens": prompt + len(words)}
    finish = "length" if truncated else "stop"
    created = int(time.time())
    if kind == "responses":
        return _responses(body, words, prompt, usage_on, delay, model, created, saw)
    chat = kind == "chat"
    base = {"id": "chatcmpl-fake" if chat else "cmpl-fake", "created": created, "model": model,
            "object": "chat.completion" if chat else "text_completion"}
    if not body.get("stream"):
        text = " ".join(words)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": finish, "logprobs": None} if chat else
            {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({**base, "choices": [choice], **({"usage": usage} if usage_on
                                                              else {})}, headers=saw)
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    events = []
    if chat:
        events.append(_data({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                      "content": ""},
                                                  "finish_reason": None}]}))
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        events.append(_data({**base, "choices": [
            {"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat else
            {"index": 0, "text": piece, "finish_reason": None}]}))
    events.append(_data({**base, "choices": [
        {"index": 0, "delta": {}, "finish_reason": finish} if chat else
        {"index": 0, "text": "", "finish_reason": finish}]}))
    options = body.get("stream_options")
    if usage_on and isinstance(options, dict) and options.get("include_usage"):
        events.append(_data({**base, "choices": [], "usage": usage}))
    events.append("data: [DONE]\n\n")
    return _sse(events, delay, saw)


def _responses(body: dict[str, Any], words: list[str], prompt: int, usage_on: bool,
               delay: float, model: str, created: int, saw: dict[str, str]) -> Response:
    """OpenAI's Responses API: one message item with one output_text part."""
    text = " ".join(words)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
            "content": [part]}
    out: dict[str, Any] = {"id": "resp_fake", "object": "response", "created_at": created,
                           "model": model, "status": "completed", "output": [item]}
    if usage_on:
        out["usage"] = {"input_tokens": prompt, "output_tokens": len(words),
                        "total_tokens": prompt + len(words)}
    if not body.get("stream"):
        return JSONResponse(out, headers=saw)
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    steps: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**out, "status": "in_progress",
                                                  "output": []}},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}}]
    steps += [{"type": "response.output_text.delta", **where,
               "delta": word if i == 0 else " " + word} for i, word in enumerate(words)]
    steps += [{"type": "response.output_text.done", **where, "text": text},
              {"type": "response.content_part.done", **where, "part": part},
              {"type": "response.output_item.done", "output_index": 0, "item": item},
              {"type": "response.completed", "response": out}]
    return _sse([_data({**step, "sequence_number": n}, step["type"])
                 for n, step in enumerate(steps)], delay, saw)


def _anthropic(body: dict[str, Any], words: list[str], truncated: bool, prompt: int,
               usage_on: bool, delay: float, model: str, saw: dict[str, str]) -> Response:
    stop = "max_tokens" if truncated else "end_turn"
    message: dict[str, Any] = {"id": "msg_fake", "type": "message", "role": "assistant",
                               "model": model, "stop_reason": stop, "stop_sequence": None}
    if not body.get("stream"):
        usage = {"input_tokens": prompt, "output_tokens": len(words)} if usage_on else None
        return JSONResponse({**message, "content": [{"type": "text", "text": " ".join(words)}],
                             **({"usage": usage} if usage else {})}, headers=saw)
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": prompt if usage_on else 0, "output_tokens": 1}}
    events = [_data({"type": "message_start", "message": start}, "message_start"),
              _data({"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}, "content_block_start"),
              _data({"type": "ping"}, "ping")]
    for i, word in enumerate(words):
        events.append(_data({"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": word if i == 0 else " " + word}},
            "content_block_delta"))
    events.append(_data({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    delta: dict[str, Any] = {"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": None}}
    delta["usage"] = {"output_tokens": len(words) if usage_on else 0}
    events.append(_data(delta, "message_delta"))
    events.append(_data({"type": "message_stop"}, "message_stop"))
    return _sse(events, delay, saw)


def create_fake_app(*, chunk_delay: float = 0.0) -> Starlette:
    async def chat(request: Request) -> Response:
        return await _handle(request, "chat")

    async def completions(request: Request) -> Response:
        return await _handle(request, "completions")

    async def responses(request: Request) -> Response:
        return await _handle(request, "responses")

    async def embeddings(request: Request) -> Response:
        return await _handle(request, "embeddings")

    async def messages(request: Request) -> Response:
        return await _handle(request, "messages")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "guardproxy"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", models),
        Route("/healthz", health),
    ])
    app.state.chunk_delay = chunk_delay
    return app


def run_fake_model(host: str = "127.0.0.1", port: int = 8000, chunk_delay: float = 0.0) -> None:
    uvicorn.run(create_fake_app(chunk_delay=chunk_delay), host=host, port=port,
                log_level="warning")
