"""Final fresh-eyes review of issue 12: the upstream's disconnect watcher (a plain asyncio
task since 990c69f), group commit under cancellation and failure, and the response fast
path on streams the earlier differentials did not name.

Invariants checked for ``UpstreamApp._http``: after it returns normally the request task
holds no cancel request of its own (``cancelling() == 0``: a stale one would break any
``asyncio.timeout`` / ``TaskGroup`` the middleware runs later); a cancel from outside
(server shutdown) is never swallowed; the upstream connection is closed; asyncio logs
nothing (no "Task was destroyed but it is pending", no "exception was never retrieved").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from guardproxy.state.group import GroupCommit
from guardproxy.upstream import UpstreamApp
from tests.servers import running_server
from tests.streams import SSE
from tests.test_fast_response_differential import CONFIGS, same_both_ways
from tests.test_upstream_boundary import (
    SSE_HEAD,
    Conn,
    Observed,
    config,
    http_scope,
    slow_upstream,
    upstream,
)

# -- helpers --------------------------------------------------------------------------


class Probe:
    """Wraps an ASGI app; records, per http request, the task's ``cancelling()`` after the
    app returned and whatever it raised."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.after: list[int] = []
        self.raised: list[BaseException] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.raised.append(exc)
            raise
        finally:
            task = asyncio.current_task()
            assert task is not None
            self.after.append(task.cancelling())


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def asyncio_errors(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    yield
    gc.collect()
    bad = [r.getMessage() for r in caplog.records
           if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert bad == [], bad


def raw_request(port: int, body_head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(body_head)
    return sock


# -- 1. the disconnect watcher through a real server ------------------------------------


async def test_disconnect_before_the_head_leaves_no_cancel_request_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    seen = Observed()
    with asyncio_errors(caplog):
        async with upstream(slow_upstream(seen)) as up:
            probe = Probe(UpstreamApp(config(up.port)))
            with running_server(probe) as url:
                async with httpx.AsyncClient() as client:
                    request = asyncio.ensure_future(client.post(
                        url + "/v1/chat/completions", content=b"{}", timeout=30))
                    await asyncio.wait_for(seen.got_request.wait(), 5)
                    request.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await request
                await asyncio.wait_for(seen.peer_closed.wait(), 5)
                await wait_for(lambda: probe.after)
    assert probe.raised == [] and probe.after == [0]
    assert not seen.finished


async def test_disconnect_mid_stream_leaves_no_cancel_request_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    seen = Observed()
    with asyncio_errors(caplog):
        async with upstream(slow_upstream(seen, head=SSE_HEAD)) as up:
            probe = Probe(UpstreamApp(config(up.port)))
            with running_server(probe) as url:
                async with httpx.AsyncClient() as client, client.stream(
                        "POST", url + "/v1/chat/completions", content=b"{}",
                        timeout=30) as resp:
                    async for _ in resp.aiter_raw():
                        break
                await asyncio.wait_for(seen.peer_closed.wait(), 5)
                await wait_for(lambda: probe.after)
    assert probe.raised == [] and probe.after == [0]


async def test_disconnect_while_a_chunked_body_uploads_closes_the_upstream(
        caplog: pytest.LogCaptureFixture) -> None:
    """The client sends a chunked body, stops half-way and closes: the upstream request
    (body streaming through) is dropped, nothing raised, nothing logged by asyncio."""
    got_head = asyncio.Event()
    closed = asyncio.Event()
    answered: list[bool] = []

    async def handler(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        got_head.set()
        await conn.peer_closed()   # reads what body comes, until the proxy closes
        closed.set()
        answered.append(False)

    with asyncio_errors(caplog):
        async with upstream(handler) as up:
            probe = Probe(UpstreamApp(config(up.port)))
            with running_server(probe) as url:
                port = int(url.rsplit(":", 1)[1])
                sock = await asyncio.to_thread(raw_request, port, (
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"5\r\n{\"a\":\r\n"))
                await asyncio.wait_for(got_head.wait(), 5)
                await asyncio.sleep(0.1)
                sock.close()
                await asyncio.wait_for(closed.wait(), 5)
                await wait_for(lambda: probe.after)
    assert probe.raised == [] and probe.after == [0]


# -- 1b. the same, in process, at the exact moments -------------------------------------


class Blocking(httpx.AsyncBaseTransport):
    """An upstream that never answers; records whether its request was cancelled."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def _app(transport: httpx.AsyncBaseTransport) -> UpstreamApp:
    return UpstreamApp(config(1), transport=transport)


async def test_a_shutdown_cancel_with_a_disconnect_is_not_swallowed() -> None:
    transport = Blocking()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    task = asyncio.ensure_future(_app(transport)(http_scope(), receive, send))
    await asyncio.wait_for(transport.entered.wait(), 5)
    gone.set()               # the client's connection closes ...
    await asyncio.sleep(0)   # (the watcher sees it and cancels the exchange)
    task.cancel()            # ... and the server shuts down in the same tick
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert transport.cancelled
    assert task.cancelled(), "the server's cancel must reach the server"


async def test_a_shutdown_cancel_alone_goes_on_up() -> None:
    transport = Blocking()

    async def once() -> Message:
        if not getattr(once, "done", False):
            once.done = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        pass

    before = set(asyncio.all_tasks())
    task = asyncio.ensure_future(_app(transport)(http_scope(), once, send))
    await asyncio.wait_for(transport.entered.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled() and transport.cancelled
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert left == set(), "the watcher task must end with the exchange"


async def test_disconnect_exactly_as_the_response_completes() -> None:
    """The last body message goes out, then at once the disconnect: a completed
    exchange, no error, no stale cancel request."""
    body = b'{"ok":true}'

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    transport = httpx.MockTransport(answer)
    sent: list[Message] = []
    final = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await final.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            final.set()
            await asyncio.sleep(0)   # let the watcher see the disconnect right now

    async def run() -> int:
        await _app(transport)(http_scope(), receive, send)
        this = asyncio.current_task()
        assert this is not None
        return this.cancelling()

    assert await asyncio.wait_for(run(), 5) == 0
    assert b"".join(m.get("body", b"") for m in sent) == body


# -- 2. group commit under cancellation and failure --------------------------------------


async def test_group_commit_failing_store_reaches_every_submitter_then_recovers() -> None:
    calls: list[list[int]] = []
    fail = [True]
    gate = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        calls.append(items)
        await gate.wait()
        if fail[0]:
            raise ConnectionError("store down")
        return [i * 2 for i in items]

    group: GroupCommit[int, int] = GroupCommit(send)
    first = asyncio.ensure_future(group.submit([1]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(group.submit([i])) for i in (2, 3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    fail[0] = False
    assert await asyncio.wait_for(group.submit([5]), 5) == [10]


async def test_group_commit_task_cancelled_mid_call_fails_submitters_without_hanging(
        caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown cancels the group's task while a call is in flight and others wait:
    every submitter hears of it (none hangs), later submits get a new task."""
    gate = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    with asyncio_errors(caplog):
        group: GroupCommit[int, int] = GroupCommit(send)
        first = asyncio.ensure_future(group.submit([1]))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(group.submit([2]))
        await asyncio.sleep(0)
        assert group.task is not None
        group.task.cancel()
        results = await asyncio.wait_for(
            asyncio.gather(first, second, return_exceptions=True), 5)
        assert all(isinstance(r, BaseException) for r in results), results
        gate.set()
        assert await asyncio.wait_for(group.submit([7]), 5) == [7]
        del first, second, results


async def test_group_commit_stop_is_not_a_cancel_of_the_submitter() -> None:
    gate = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    group: GroupCommit[int, int] = GroupCommit(send)
    submitter = asyncio.ensure_future(group.submit([1]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)   # the group's task is in its call
    assert group.task is not None
    group.task.cancel()
    outcome = await asyncio.wait_for(asyncio.gather(submitter, return_exceptions=True), 5)
    assert not isinstance(outcome[0], asyncio.CancelledError), \
        "a submitter nobody cancelled should get an Exception (e.g. StoreError)"


async def test_group_commit_task_cancelled_before_it_starts_does_not_hang() -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    group: GroupCommit[int, int] = GroupCommit(send)
    submitter = asyncio.ensure_future(group.submit([1]))
    await asyncio.sleep(0)   # the submitter made the task; it has not run yet
    assert group.task is not None
    group.task.cancel()      # e.g. a shutdown that cancels every task of the loop
    try:
        outcome = await asyncio.wait_for(
            asyncio.gather(submitter, return_exceptions=True), 2)
    finally:
        submitter.cancel()
    assert isinstance(outcome[0], BaseException)


async def test_group_commit_cancelled_submitter_does_not_lose_others() -> None:
    gate = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        await gate.wait()
        return [i + 100 for i in items]

    group: GroupCommit[int, int] = GroupCommit(send)
    a = asyncio.ensure_future(group.submit([1]))
    await asyncio.sleep(0)
    b = asyncio.ensure_future(group.submit([2]))
    c = asyncio.ensure_future(group.submit([3]))
    await asyncio.sleep(0)
    b.cancel()
    gate.set()
    assert await a == [101] and await c == [103]
    assert b.cancelled()


# -- 3. the response fast path on streams not named before --------------------------------


def _event(data: str, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    return f"data: {data}{nl}{nl}".encode()


def _chat(text: str, index: int = 0, finish: str = "null", extra: str = "") -> str:
    return ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
            f'"choices":[{{"index":{index},"delta":{{"content":{text}}}{extra},'
            f'"finish_reason":{finish}}}]}}')


USAGE = ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
         '"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}')


def _streams() -> dict[str, list[bytes]]:
    texts = ['"Hello"', '" wor\\"ld"', '"\\u00e9t\\u00e9"', '"tab\\there"', '"\\ud83d\\ude00"',
             '"a\\\\b"', '"plain again"']
    base = [_event(_chat(t)) for t in texts]
    return {
        "index-1": [_event(_chat(t, index=1)) for t in texts]
        + [_event(_chat('""', index=1, finish='"stop"')), _event(USAGE), b"data: [DONE]\n\n"],
        "two-choices": [e for t in texts for e in (_event(_chat(t, 0)), _event(_chat(t, 1)))]
        + [_event(USAGE), b"data: [DONE]\n\n"],
        "crlf": [_event(_chat(t), crlf=True) for t in texts]
        + [_event(USAGE, crlf=True), b"data: [DONE]\r\n\r\n"],
        "string-index": [_event(_chat(t).replace('"index":0', '"index":"1"')) for t in texts]
        + [_event(USAGE)],
        "obfuscation": [_event(_chat(t, extra=f',"obfuscation":"{"x" * i}"'))
                        for i, t in enumerate(texts)] + [_event(USAGE)],
        "long": [_event(_chat('"' + "long text " * 20000 + '"')), *base, _event(USAGE)],
        "plain": [*base, _event(_chat('""', finish='"stop"')), _event(USAGE), b"data: [DONE]\n\n"],
    }


def _cuts(events: list[bytes], how: str) -> list[bytes]:
    body = b"".join(events)
    if how == "events":
        return events
    if how == "bytes":
        return [body[i:i + 1] for i in range(len(body))] if len(body) < 5000 else events
    if how == "at-escapes":   # cut right after every backslash: escapes split across reads
        out, last = [], 0
        for i, byte in enumerate(body):
            if byte == 0x5C:
                out.append(body[last:i + 1])
                last = i + 1
        return [*out, body[last:]]
    raise ValueError(how)


@pytest.mark.parametrize("name", sorted(_streams()))
@pytest.mark.parametrize("how", ["events", "bytes", "at-escapes"])
@pytest.mark.parametrize("config", ["meter-hide", "meter-hide+canary", "shadow"])
def test_fast_path_named_openai_streams(name: str, how: str, config: str) -> None:
    assert config in CONFIGS
    same_both_ways(config, "openai", SSE, _cuts(_streams()[name], how))


def _anthropic(crlf: bool) -> list[bytes]:
    nl = "\r\n" if crlf else "\n"

    def ev(kind: str, data: str) -> bytes:
        return f"event: {kind}{nl}data: {data}{nl}{nl}".encode()

    out = [ev("message_start", '{"type":"message_start","message":{"id":"m","type":"message",'
              '"role":"assistant","content":[],"model":"c","usage":{"input_tokens":25,'
              '"output_tokens":1}}}'),
           ev("content_block_start", '{"type":"content_block_start","index":0,'
              '"content_block":{"type":"text","text":""}}')]
    for text in ('"Hel"', '"lo \\"q\\""', '"\\u00e9"', '"end"'):
        out.append(ev("content_block_delta", '{"type":"content_block_delta","index":0,'
                      f'"delta":{{"type":"text_delta","text":{text}}}}}'))
    out += [ev("content_block_stop", '{"type":"content_block_stop","index":0}'),
            ev("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
               '"usage":{"output_tokens":12}}'),
            ev("message_stop", '{"type":"message_stop"}')]
    return out


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("how", ["events", "bytes", "at-escapes"])
@pytest.mark.parametrize("config", ["meter-hide", "meter-hide+canary", "shadow"])
def test_fast_path_anthropic_streams(crlf: bool, how: str, config: str) -> None:
    same_both_ways(config, "anthropic", SSE, _cuts(_anthropic(crlf), how))
