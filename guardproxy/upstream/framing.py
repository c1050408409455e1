"""Response framing for HTTP/1.0 clients, for the outermost ASGI layer to apply.

HTTP/1.0 has no chunked transfer-coding: a body without ``content-length`` must be
delimited by closing the connection. uvicorn's httptools implementation (its default
whenever httptools is installed, as here) nevertheless answers an HTTP/1.0 request with
``transfer-encoding: chunked`` whenever the ASGI response has no ``content-length`` (h11
gets it right, by closing). An ASGI app cannot ask for close-delimited framing, so the
only fix at this level is to give every body response to an HTTP/1.0 client a length:
hold the head, collect the body, and send both at the end.

This has to wrap the *last* ``send`` before the server (``GuardMiddleware``, after the
response stages, which may change the body and drop ``content-length``); wrapping
``UpstreamApp`` alone does not help. An HTTP/1.0 client of a stream gets it whole, at the
end: it could not have read it as a stream anyway.
"""

from __future__ import annotations

from starlette.types import Message, Scope, Send

_NO_BODY_STATUS = frozenset({204, 304})


def http10_send(scope: Scope, send: Send) -> Send:
    """``send`` itself, unless ``scope`` is an HTTP/1.0 request: then a ``send`` that
    holds ``http.response.start`` (when it lacks ``content-length``) until the body is
    complete, and sends the head with the body's length and the body in one message.
    Responses without a body (HEAD, 1xx, 204, 304) and responses that carry a length
    pass through unchanged."""
    if scope.get("type") != "http" or scope.get("http_version") != "1.0":
        return send
    held: dict[str, Message] = {}
    parts: list[bytes] = []

    async def framed(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if (scope.get("method") == "HEAD" or message["status"] < 200
                    or message["status"] in _NO_BODY_STATUS
                    or any(n.lower() == b"content-length" for n, _ in headers)):
                await send(message)
                return
            held["start"] = message
            return
        if message["type"] != "http.response.body" or "start" not in held:
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start = held.pop("start")
        body = b"".join(parts)
        parts.clear()
        headers = [(n, v) for n, v in start.get("headers", [])
                   if n.lower() != b"transfer-encoding"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return framed
