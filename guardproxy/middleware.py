"""``GuardMiddleware``: the guards as pure ASGI middleware around any model-serving app.

    from guardproxy import GuardMiddleware
    app = GuardMiddleware(inner_app, policy="policies/default.yaml")

The standalone proxy is this middleware around ``UpstreamApp``; embedded, "forwarding
upstream" means calling the developer's own app. The request path is normalised once
and the normalised path is what the guards match and what the inner app receives. On
generation endpoints the body is always read and parsed (whatever its content type),
so guards and upstream read one request. The inner app gets a ``RequestInfo`` in
``scope["state"]["guardproxy"]``, never the client's key. Paths in the policy's
``unguarded:`` list pass straight through; WebSockets are refused unless unguarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardproxy.audit.trail import audit_observer
from guardproxy.dialects import CLIENT_CREDENTIAL_HEADERS
from guardproxy.errors import GuardProxyError, RequestError
from guardproxy.exchange import Exchange
from guardproxy.flow import Admission, LeaseKeeper, Pipeline
from guardproxy.identity.client_ip import forwarded_for
from guardproxy.ids import IdSource
from guardproxy.linkage.carry import usage_carry
from guardproxy.linkage.enricher import LinkageEnricher, linkage_enricher
from guardproxy.metrics import metrics_observer
from guardproxy.observe import LogObserver, Observer, Observers
from guardproxy.policy.load import load_policy
from guardproxy.policy.match import Pattern
from guardproxy.policy.model import Policy
from guardproxy.request.body import parse_json
from guardproxy.request.path import normalize_path
from guardproxy.response.events import Ending
from guardproxy.state import State, open_state
from guardproxy.trace import BYTES_IN, Trace
from guardproxy.upstream.framing import http10_send
from guardproxy.upstream.headers import HOP_BY_HOP

log = logging.getLogger("guardproxy")
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
# the client credential list every layer uses: a key never reaches the inner app
_CREDENTIALS = frozenset(name.encode() for name in CLIENT_CREDENTIAL_HEADERS)
_REPLACED = _CREDENTIALS | {b"content-length", b"x-request-id"}


class GuardMiddleware:
    def __init__(self, app: ASGIApp, policy: str | Path | Policy, *,
                 state: State | None = None, observer: Observer | None = None) -> None:
        self.app = app
        loaded = policy if isinstance(policy, Policy) else load_policy(policy)
        self.owns_state = state is None
        self.state = state or open_state(loaded.state, loaded.key_prefix)
        self.observer = observer
        self.new_request_id = IdSource()
        self.linkage: LinkageEnricher | None = linkage_enricher(loaded, self.state)
        self.pipeline = Pipeline(loaded, self.state, self._observers(loaded),
                                 _enrichers(self.linkage))
        _carry_usage(self.linkage, self.pipeline)
        self.unguarded = Pattern.compile(loaded.unguarded, glob=True)
        self._closing: set[asyncio.Task[None]] = set()

    def swap(self, policy: Policy) -> None:
        """Build the pipeline of a new policy aside, on the same state (counters and
        budgets carry over), and swap it in whole. Requests in flight finish on the
        policy they started with. Raises ``ValueError`` when the state URI changed."""
        if (policy.state, policy.key_prefix) != (self.state.uri, self.state.key_prefix):
            raise ValueError("a reload cannot change 'state' or 'key_prefix': restart")
        linkage = linkage_enricher(policy, self.state)
        observers = Observers()   # filled once the pipeline is built: a policy whose
        pipeline = Pipeline(policy, self.state, observers, _enrichers(linkage))
        observers.observers = self._observers(policy).observers   # rules fail changes nothing
        old, self.linkage = self.linkage, linkage
        self.pipeline, self.unguarded = pipeline, Pattern.compile(policy.unguarded, glob=True)
        _carry_usage(linkage, pipeline)
        if old is not None and old is not linkage:  # linkage: changed or went away
            self.state.extras.pop(("linkage", old.settings), None)
            with contextlib.suppress(RuntimeError):  # no loop running: nothing started
                task = asyncio.get_running_loop().create_task(old.aclose())
                self._closing.add(task)  # held until done: the loop keeps weak references
                task.add_done_callback(self._closing.discard)

    def _observers(self, policy: Policy) -> Observers:
        """The embedder's observer (default: decision log lines), then the policy's
        audit trail and the process's metrics, each kept in the state across reloads."""
        extra = (audit_observer(policy, self.state), metrics_observer(policy, self.state))
        return Observers(self.observer or LogObserver(), *(o for o in extra if o is not None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, http10_send(scope, send))
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.linkage is not None:
                await self.linkage.start()
            if message["type"] == "lifespan.shutdown.complete":
                if self.linkage is not None:
                    await self.linkage.aclose()
                for o in self.pipeline.observer.observers:   # the audit writer: flushed
                    close = getattr(o, "aclose", None)
                    if close is not None:
                        await close()
                if self.owns_state:
                    await self.state.aclose()
            await send(message)

        return wrapped

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guards see HTTP only, so a WebSocket would be a way around them: refused
        (403 at the handshake) unless its path is unguarded."""
        try:
            path, raw_path = normalize_path(_target(scope))
        except RequestError:
            path, raw_path = "", b""
        if path and self.unguarded(path):
            await self.app({**scope, "path": path, "raw_path": raw_path}, receive, send)
            return
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self.pipeline  # one policy for the whole request, even across a reload
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        peer = scope["client"][0] if scope.get("client") else ""
        given_id = headers.get("x-request-id", "")[:128]  # kept in the ledger: bounded
        exchange = Exchange(method=scope["method"], path="", headers=headers,
                            client_ip=pipeline.identifier.client_ip(
                                peer, forwarded_for(scope["headers"])),
                            peer_trusted=pipeline.identifier.peer_trusted(peer),
                            request_id=given_id or self.new_request_id())
        bad: GuardProxyError | None = None
        try:
            exchange.path, raw_path = normalize_path(_target(scope))
        except GuardProxyError as exc:
            bad, raw_path = exc, b""
        if bad is None and self.unguarded(exchange.path):
            await self.app({**scope, "path": exchange.path, "raw_path": raw_path}, receive, send)
            return
        trace = Trace(exchange)   # every guarded request ends in one RequestRecord
        try:
            if bad is not None:
                await _error(trace.wrap(send), pipeline, bad.status, bad.kind, "", bad.message,
                             exchange)
            else:
                await self._guarded(pipeline, scope, receive, trace.wrap(send), exchange,
                                    trace, peer, raw_path)
        finally:
            try:
                record = trace.record(pipeline)
            except Exception:   # a bug here must not turn an answered request into a 500
                log.exception("recording request %s failed", exchange.request_id)
            else:
                pipeline.observer.completed(record)

    async def _guarded(self, pipeline: Pipeline, scope: Scope, receive: Receive, send: Send,
                       exchange: Exchange, trace: Trace, peer: str, raw_path: bytes) -> None:
        try:
            exchange.account = pipeline.identifier.account(peer, exchange.headers)
            await self._read_request(pipeline, exchange, receive)
            await pipeline.enrich(exchange)  # after the body: linkage reads the prompt
            admission = await pipeline.admit(exchange)
        except GuardProxyError as exc:
            await _error(send, pipeline, exc.status, exc.kind, "", exc.message, exchange)
            return
        except RecursionError:  # JSON nested deeper than the guards can walk
            await _error(send, pipeline, 400, "invalid_request", "",
                         "Request body is nested too deeply.", exchange)
            return
        trace.admission = admission
        if admission.denial is not None:
            d = admission.denial
            await _error(send, pipeline, d.status, d.kind, d.code, d.message, exchange,
                         d.retry_after, admission)
            return
        scope = {**scope, "path": exchange.path, "raw_path": raw_path}
        await self._forward(pipeline, scope, receive, send, exchange, admission, trace)

    async def _read_request(self, pipeline: Pipeline, exchange: Exchange,
                            receive: Receive) -> None:
        """Read the body the guards need. On a generation endpoint it is always read and
        parsed, whatever the method or content type says (a lenient upstream parses it
        anyway). Elsewhere a body labelled JSON, or not labelled at all, is read too,
        and parsed when it is JSON. Then the dialect makes the request plan."""
        headers = exchange.headers
        generation = pipeline.dialect.endpoint(exchange.path) is not None
        ctype = headers.get("content-type", "").lower()
        labelled_json = "json" in ctype
        if not (generation or labelled_json or not ctype or ctype.startswith("text/plain")):
            return  # multipart uploads, audio…: streamed through unread
        if exchange.method in _NO_BODY and "content-length" not in headers \
                and "transfer-encoding" not in headers:
            return
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise RequestError("Compressed request bodies are not accepted.", status=415)
        exchange.body = await _read_body(receive, pipeline.policy.clients.max_body_bytes)
        exchange.notes[BYTES_IN] = len(exchange.body)   # before any guard reshapes it
        if not exchange.body and (exchange.method in _NO_BODY or not generation):
            return
        if generation or labelled_json:
            parsed = parse_json(exchange.body)
        else:
            try:
                parsed = parse_json(exchange.body)
            except RequestError:
                if not _lenient_json(exchange.body):
                    return  # no JSON parser reads it: the upstream cannot read it as JSON
                raise  # Python's json reads it (FastAPI, vLLM), otherwise than we would
        if not isinstance(parsed, dict):
            if generation:
                raise RequestError("Request body must be a JSON object.")
            return
        exchange.json = parsed
        exchange.plan = pipeline.dialect.plan(exchange.path, parsed, pipeline.policy.upstream)

    async def _forward(self, pipeline: Pipeline, scope: Scope, receive: Receive, send: Send,
                       exchange: Exchange, admission: Admission, trace: Trace) -> None:
        body = exchange.forwarded_body() if exchange.body is not None else None
        request_id = exchange.request_id.encode("latin-1", "replace")
        parsed = exchange.json is not None
        drop = _REPLACED - ({b"content-length"} if body is None else set())
        if parsed:
            drop = drop | {b"content-type"}
        inner_headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
        if body is not None:
            inner_headers.append((b"content-length", str(len(body)).encode()))
        if parsed:  # read as JSON here, so labelled JSON there: one reading on both sides
            inner_headers.append((b"content-type", b"application/json"))
        inner_headers.append((b"x-request-id", request_id))
        inner_scope = {**scope, "headers": inner_headers,
                       "state": {**scope.get("state", {}), "guardproxy": exchange.info()}}
        inner_receive = _replay(body, receive) if body is not None else receive
        dialect = pipeline.dialect
        rates = dialect.rate_headers(admission.rates.values(), time.time())
        driver = pipeline.response(exchange, admission)
        client_gone: list[bool] = []

        async def send_out(message: Message) -> None:
            if message["type"] == "http.response.start":
                upstream = [(k, v) for k, v in message.get("headers", [])
                            if k.lower() not in HOP_BY_HOP and k.lower() != b"x-request-id"]
                driver.start(message["status"], upstream)
                if driver.resizes:
                    upstream = [(k, v) for k, v in upstream if k.lower() != b"content-length"]
                out = dialect.merge_rate_headers(upstream, rates)
                out.append((b"x-request-id", request_id))
                message = {**message, "headers": out}
                driver.started = True
            elif message["type"] == "http.response.body":
                trace.upstream_body(len(message.get("body", b"")))
                final = not message.get("more_body", False)
                message = {**message, "body": driver.body(message.get("body", b""), final)}
            try:
                await send(message)
            except OSError:  # ASGI 2.4 servers raise it once the client is gone
                client_gone.append(True)
                raise

        keeper = LeaseKeeper(admission.leases, min((lease.ttl for lease in admission.leases),
                                                   default=60.0) / 3)
        ending = Ending.CANCELLED
        trace.forwarding(admission)
        try:
            await self.app(inner_scope, inner_receive, send_out)
            ending = Ending.COMPLETED if driver.completed else (
                Ending.DISCONNECTED if driver.started else Ending.CANCELLED)
        except Exception as exc:
            ending = await _failed(exc, send, pipeline, exchange, admission, driver.started,
                                   client_gone)
        finally:
            keeper.stop()
            await driver.finish(ending)
            trace.ended(ending)


async def _failed(exc: Exception, send: Send, pipeline: Pipeline, exchange: Exchange,
                  admission: Admission, started: bool, client_gone: list[bool]) -> Ending:
    """Classify how a forwarded exchange broke, and end the client's response cleanly:
    never a bare 500, never a traceback, never an upstream address."""
    if client_gone:  # the server's send raised: the client went away
        return Ending.DISCONNECTED if started else Ending.CANCELLED
    if isinstance(exc, GuardProxyError):  # UpstreamError, ResponseAborted, RequestError…
        log.warning("%s %s (%s) failed: %s", exchange.method, exchange.path,
                    exchange.request_id, exc)
        status, kind, message = exc.status, exc.kind, exc.message
    else:  # a bug in the app behind us: logged in full, told to the client in general
        log.exception("%s %s (%s): the app behind guardproxy failed", exchange.method,
                      exchange.path, exchange.request_id)
        status, kind, message = 502, "upstream", "The upstream failed."
    try:
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return Ending.TRUNCATED
        await _error(send, pipeline, status, kind, "", message, exchange, 0.0, admission)
    except OSError:
        return Ending.DISCONNECTED if started else Ending.CANCELLED
    return Ending.UPSTREAM_FAILED


def _enrichers(linkage: LinkageEnricher | None) -> tuple[LinkageEnricher, ...]:
    return () if linkage is None else (linkage,)


def _carry_usage(linkage: LinkageEnricher | None, pipeline: Pipeline) -> None:
    """Cluster merges carry ``per: cluster`` usage as this pipeline's rules count it."""
    if linkage is not None:
        linkage.merges.wire(usage_carry(pipeline.guards, pipeline.state.budgets))


def _target(scope: Scope) -> bytes:
    """The request path as received: ``raw_path`` without the query some servers leave
    in it, else the decoded ``path`` (where a '?' is part of the path)."""
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).split(b"?", 1)[0]
    return str(scope["path"]).encode("utf-8", "surrogateescape")


def _lenient_json(body: bytes) -> bool:
    """Whether Python's own ``json.loads`` (Starlette's ``request.json()``) reads ``body``:
    it takes duplicate keys, NaN, a byte-order mark, UTF-16 and UTF-32."""
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("client disconnected while sending the request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(f"Request body exceeds {limit} bytes.", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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
    headers.append((b"x-request-id", exchange.request_id.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["GuardMiddleware"]
