"""``GuardMiddleware``: the guards as pure ASGI middleware around any model-serving app.

    from guardproxy import GuardMiddleware
    app = GuardMiddleware(inner_app, policy="policies/default.yaml")

The standalone proxy is this middleware around ``UpstreamApp``; embedded, "forwarding
upstream" means calling the developer's own app. The request's account is put in
``scope["state"]["guardproxy"]`` for the inner app; the client's key is removed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardproxy.errors import GuardProxyError, RequestError, UpstreamError
from guardproxy.exchange import Exchange
from guardproxy.flow import Admission, Pipeline
from guardproxy.ids import IdSource
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.state import State
from guardproxy.upstream.headers import HOP_BY_HOP

log = logging.getLogger("guardproxy")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, policy: str | Path | Policy,
                 *, state: State | None = None) -> None:
        self.app = app
        self.pipeline = Pipeline(policy if isinstance(policy, Policy) else load_policy(policy),
                                 state)
        self.max_body = self.pipeline.policy.clients.max_body_bytes
        self.new_request_id = IdSource()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.pipeline.aclose()
            await send(message)

        return wrapped

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self.pipeline  # one policy for the whole request, even across a reload
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        peer = scope["client"][0] if scope.get("client") else ""
        given_id = headers.get("x-request-id", "")[:128]  # kept in the ledger: bounded
        exchange = Exchange(method=scope["method"], path=scope["path"], headers=headers,
                            client_ip=pipeline.identifier.client_ip(peer, headers),
                            request_id=given_id or self.new_request_id())
        try:
            exchange.account = pipeline.identifier.account(peer, headers)
            if exchange.method in _BODY_METHODS and "json" in headers.get("content-type", ""):
                await self._read_json(exchange, receive)
            admission = await pipeline.admit(exchange)
        except GuardProxyError as exc:
            await _error(send, pipeline, exc.status, exc.kind, "", exc.message, exchange)
            return
        if admission.denial is not None:
            d = admission.denial
            await _error(send, pipeline, 429, d.kind, d.code, d.message, exchange,
                         d.retry_after, admission)
            return
        await self._forward(scope, receive, send, exchange, admission)

    async def _read_json(self, exchange: Exchange, receive: Receive) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError("client disconnected while sending the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise RequestError(f"Request body exceeds {self.max_body} bytes.", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        exchange.body = b"".join(chunks)
        try:
            parsed = json.loads(exchange.body) if exchange.body else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"Request body is not valid JSON: {exc}") from None
        if isinstance(parsed, dict):
            exchange.json = parsed

    async def _forward(self, scope: Scope, receive: Receive, send: Send,
                       exchange: Exchange, admission: Admission) -> None:
        pipeline = self.pipeline
        body = exchange.forwarded_body() if exchange.body is not None else None
        inner_scope = dict(scope)
        inner_scope["headers"] = [(k, v) for k, v in scope["headers"]
                                  if k not in _CREDENTIALS
                                  and not (body is not None and k == b"content-length")]
        if body is not None:
            inner_scope["headers"].append((b"content-length", str(len(body)).encode()))
        inner_scope["state"] = {**scope.get("state", {}), "guardproxy": exchange}
        inner_receive = _replay(body, receive) if body is not None else receive
        rate_headers = pipeline.dialect.rate_headers(admission.rates.values(), time.time())
        stages = pipeline.response_stages(exchange, admission)
        rewriting = list(stages)  # a stage that fails is dropped here, but still finished
        progress = {"started": False, "complete": False}

        async def send_out(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress["started"] = True
                out = [(k, v) for k, v in message.get("headers", []) if k not in HOP_BY_HOP
                       and not (stages and k == b"content-length")]  # stages may resize
                for stage in stages:
                    stage.start(message["status"], out)
                message = {**message, "headers": out + rate_headers}
            elif message["type"] == "http.response.body":
                final = not message.get("more_body", False)
                if rewriting:
                    message = {**message, "body": _through(rewriting, message.get("body", b""),
                                                           final)}
                progress["complete"] = final
            await send(message)

        ending = Ending.DISCONNECTED
        try:
            await self.app(inner_scope, inner_receive, send_out)
            if progress["complete"]:
                ending = Ending.COMPLETED
        except UpstreamError as exc:
            ending = Ending.UPSTREAM_FAILED
            log.warning("upstream error for %s %s: %s", exchange.method, exchange.path, exc)
            if not progress["started"]:
                await _error(send, pipeline, exc.status, exc.kind, "", exc.message, exchange,
                             0.0, admission)
        finally:
            for stage in stages:
                try:
                    await stage.finish(ending)
                except Exception:  # a failing stage must not break the response
                    log.exception("response stage failed to finish")


def _through(stages: list[ResponseStage], data: bytes, final: bool) -> bytes:
    """Run a body chunk through the response stages. A stage that raises is a bug, and
    must not cut the client's response off: it is logged and left out from then on."""
    for stage in list(stages):
        try:
            data = stage.chunk(data, final)
        except Exception:
            log.exception("response stage %s failed; passing the rest of the response "
                          "through without it", type(stage).__name__)
            stages.remove(stage)
    return data


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Send, pipeline: Pipeline, status: int, kind: str, code: str,
                 message: str, exchange: Exchange, retry_after: float = 0.0,
                 admission: Admission | None = None) -> None:
    rates: Any = admission.rates.values() if admission else ()
    headers, body = pipeline.dialect.error_response(status, kind, code, message,
                                                    retry_after, rates)
    headers.append((b"x-request-id", exchange.request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
