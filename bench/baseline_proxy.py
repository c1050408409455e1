"""A bare pass-through reverse proxy (Starlette + httpx): the reference point of the bench.

It does what any minimal proxy must: forward method, path, query, headers (minus hop-by-hop
ones) and body; relay SSE responses chunk by chunk and buffer small non-streamed ones.
No auth, no policy, no accounting. The httpx transport is selectable so the bench can
compare aiohttp's (``httpx_aiohttp.AiohttpTransport``, what guardproxy uses) with httpx's
default httpcore pool, under the same connection limits as guardproxy.

Run: ``python -m bench.baseline_proxy --upstream http://127.0.0.1:9000 --port 9001
--transport aiohttp`` (binds 127.0.0.1 only, one uvicorn worker, uvloop + httptools).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.payloads import LOOPBACK

TRANSPORTS = ("aiohttp", "httpcore")
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length"}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# The same pool limits as guardproxy.upstream.forward.make_client.
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def make_client(transport: str) -> httpx.AsyncClient:
    if transport == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=LIMITS.max_connections or 0,
                                             keepalive_timeout=30)
            return aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar())

        chosen: httpx.AsyncBaseTransport = AiohttpTransport(limits=LIMITS, client=session)
    elif transport == "httpcore":
        chosen = httpx.AsyncHTTPTransport(limits=LIMITS, trust_env=False)
    else:
        raise ValueError(f"unknown transport {transport!r} (choose from {TRANSPORTS})")
    client = httpx.AsyncClient(transport=chosen, timeout=TIMEOUT, follow_redirects=False,
                               trust_env=False)
    client.headers.clear()
    return client


def create_app(upstream: str, transport: str) -> Starlette:
    base = upstream.rstrip("/")
    holder: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        holder["client"] = make_client(transport)
        try:
            yield
        finally:
            await holder.pop("client").aclose()

    async def proxy(request: Request) -> Response:
        client = holder["client"]
        url = base + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in _REQUEST_DROP]
        upstream_request = client.build_request(request.method, url, headers=headers,
                                                content=await request.body())
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return Response(f"upstream error: {exc}", status_code=502)
        out = {k: v for k, v in response.headers.items() if k.lower() not in _RESPONSE_DROP}
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                     headers=out, background=BackgroundTask(response.aclose))
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Response(body, status_code=response.status_code, headers=out)

    return Starlette(routes=[Route("/{path:path}", proxy, methods=_METHODS)],
                     lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=TRANSPORTS, default="aiohttp")
    args = parser.parse_args(argv)
    if not args.upstream.startswith(f"http://{LOOPBACK}:"):
        parser.error(f"--upstream must be http://{LOOPBACK}:PORT (loopback only)")
    uvicorn.run(create_app(args.upstream, args.transport), host=LOOPBACK, port=args.port,
                loop="uvloop", http="httptools", workers=1, log_level="warning",
                access_log=False, server_header=False, date_header=False)


if __name__ == "__main__":
    main()
