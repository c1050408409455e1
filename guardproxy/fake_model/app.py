"""The fake model's ASGI app: routes, one request's journey, the executed ledger."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guardproxy.fake_model.anthropic import message_json, message_stream
from guardproxy.fake_model.knobs import (
    Behaviour,
    Refusal,
    parse_behaviour,
    read_json_body,
    read_params,
)
from guardproxy.fake_model.ledger import Executed, Ledger
from guardproxy.fake_model.openai import (
    completion_json,
    completion_stream,
    embeddings_json,
    responses_json,
    responses_stream,
)
from guardproxy.fake_model.text import Job, plan_job
from guardproxy.fake_model.wire import (
    Piece,
    StreamAnswer,
    audio_body,
    bytes_answer,
    json_answer,
    own_ratelimit,
)

_POLL = 0.02  # seconds between disconnect checks while slow-headers holds an answer


def _saw(request: Request, raw: bytes) -> dict[str, str]:
    auth = request.headers.get("authorization", "-")
    return {"x-fake-saw-authorization": auth,
            # for a proxy that drops headers echoing its upstream credentials
            "x-fake-saw-authorization-sha256": hashlib.sha256(auth.encode()).hexdigest(),
            "x-fake-saw-api-key": request.headers.get("x-api-key", "-"),
            "x-fake-saw-cookie": request.headers.get("cookie", "-"),
            "x-fake-saw-content-type": request.headers.get("content-type", "-"),
            "x-fake-saw-body-sha256": hashlib.sha256(raw).hexdigest(),
            "set-cookie": "fake=1; Path=/"}


async def _client_left(request: Request, seconds: float) -> bool:
    """Hold the answer ``seconds``; True as soon as the client has gone away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(_POLL, left))
    return await request.is_disconnected()


async def _handle(request: Request, kind: str) -> Response:
    raw = await request.body()
    headers = _saw(request, raw)
    anthropic = kind == "messages"
    ledger: Ledger = request.app.state.ledger
    record = ledger.open(request.headers.get("x-request-id"), request.url.path)
    behave = Behaviour()
    try:
        behave = parse_behaviour(request.headers.get("x-fake-behave", ""))
        if behave.own_ratelimit:
            headers.update(own_ratelimit(anthropic))
        if behave.slow_headers and await _client_left(request, behave.slow_headers):
            record.cancelled = "before"
            record.finished = True
            return Response(status_code=499)  # nobody is left to read it
        body = read_json_body(raw, request.headers.get("content-type"), behave.lenient)
        if status := request.headers.get("x-fake-status"):
            raise Refusal(int(status), f"fake error {status}", kind="fake_error")
        words = request.headers.get("x-fake-words")
        params = read_params(kind, body, behave, int(words) if words else None)
    except Refusal as refusal:
        record.status = refusal.status
        record.finished = True
        return json_answer(refusal.body(anthropic), refusal.status, headers, behave)
    usage_on = request.headers.get("x-fake-no-usage") != "1" and not behave.no_usage \
        and not behave.audio
    job = plan_job(kind, body, params, behave, usage_on)
    record.status = 200
    record.prompt_tokens = job.prompt
    record.completions = 0 if kind == "embeddings" else job.sequences
    if behave.audio:
        record.completion_tokens = job.completion_tokens
        record.finished = True
        return bytes_answer(audio_body(), 200, headers, behave, "audio/mpeg")
    if kind == "embeddings" or not params.stream:
        return _whole(job, body, record, headers)
    record.stream = True
    delay = float(request.headers.get("x-fake-chunk-delay", request.app.state.chunk_delay))
    return StreamAnswer(_pieces(job), headers=headers, delay=delay, behave=behave,
                        record=record)


def _whole(job: Job, body: dict[str, object], record: Executed,
           headers: dict[str, str]) -> Response:
    if job.kind == "embeddings":
        obj = embeddings_json(job, body)
    else:
        obj = (message_json(job) if job.kind == "messages" else
               responses_json(job) if job.kind == "responses" else completion_json(job))
        record.completion_tokens = job.completion_tokens
    record.usage_sent = job.usage_on
    record.finished = True
    return json_answer(obj, 200, headers, job.behave)


def _pieces(job: Job) -> Iterator[Piece]:
    if job.kind == "messages":
        return message_stream(job)
    if job.kind == "responses":
        return responses_stream(job)
    return completion_stream(job)


def create_fake_app(*, chunk_delay: float = 0.0) -> Starlette:
    def endpoint(kind: str) -> Route:
        async def handle(request: Request) -> Response:
            return await _handle(request, kind)

        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                "responses": "/v1/responses", "embeddings": "/v1/embeddings",
                "messages": "/v1/messages"}[kind]
        return Route(path, handle, methods=["POST"])

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "guardproxy"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def executed(request: Request) -> Response:
        ledger: Ledger = request.app.state.ledger
        if request.method == "DELETE":
            return JSONResponse({"cleared": ledger.clear()})
        return JSONResponse(ledger.dump())

    app = Starlette(routes=[
        *(endpoint(kind) for kind in ("chat", "completions", "responses", "embeddings",
                                      "messages")),
        Route("/v1/models", models),
        Route("/healthz", health),
        Route("/_fake/executed", executed, methods=["GET", "DELETE"]),
    ])
    app.state.chunk_delay = chunk_delay
    app.state.ledger = Ledger()
    return app


def run_fake_model(host: str = "127.0.0.1", port: int = 8000, chunk_delay: float = 0.0) -> None:
    uvicorn.run(create_fake_app(chunk_delay=chunk_delay), host=host, port=port,
                log_level="warning")
