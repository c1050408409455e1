"""Attacks on the request record (issue 11) and the batched budget settle (issue 12)
that are confirmed: each test fails while the flaw is there."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from guardproxy import GuardMiddleware
from tests.conftest import write_policy
from tests.test_request_record import RULES, Recorder


async def _ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000], ids=["superscript", "5000-digits"])
async def test_client_content_length_cannot_suppress_the_record(
        tmp_path: Path, length: bytes) -> None:
    """An unread (multipart) body: the record takes bytes_in from the client's
    Content-Length. ``str.isdigit`` accepts '²' (latin-1 0xb2) and 5000-digit strings,
    and ``int`` then raises: the request is answered but leaves no record (no audit line,
    no metrics)."""
    recorder = Recorder()
    app = GuardMiddleware(_ok_app, write_policy(tmp_path, RULES), observer=recorder)
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"p"), (b"authorization", b"Bearer key-alice"),
                    (b"content-type", b"multipart/form-data; boundary=x"),
                    (b"content-length", length)]}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent and sent[0]["status"] == 200
    assert len(recorder.records) == 1, "the answered request left no RequestRecord"
