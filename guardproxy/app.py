"""The standalone proxy: ``GuardMiddleware`` around the upstream, plus its local routes.

On the proxy port:

    GET /healthz    200 {"status": "ok"}: the process is up and serving (liveness)
    GET /readyz     200 {"status": "ready", "version", "store"} or 503 {"status":
                    "unready", …}: a policy is loaded and the state store answers a PING
                    within READY_TIMEOUT seconds, or every rule has on_store_error: allow
                    (the proxy serves without it: "store": "unreachable")
    GET /metrics    Prometheus text (guardproxy.metrics)       } here unless admin.listen
    /admin/*        AdminApp, when admin.token is set          } is set: then 404 here
                    (no admin.token and no admin.listen: /admin/* is forwarded as any path)
    anything else   through the guards to the upstream

With ``admin.listen`` the process also listens on that address (``guardproxy serve``
binds it and sets ``ProxyApp.admin_address``); a connection that arrived there is
served /admin/*, /metrics, /healthz and /readyz only, never the proxy. The listener is
told apart by the local address the connection arrived on (``scope["server"]``).

``ProxyApp.reloader`` (guardproxy/reload.py) reloads the policy on a file change,
SIGHUP or ``POST /admin/reload``; ``ProxyApp.swap`` is what it applies.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardproxy.admin import AdminApp
from guardproxy.errors import PolicyError
from guardproxy.metrics import metrics_app, metrics_for, worker_exited
from guardproxy.middleware import GuardMiddleware
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy, UpstreamConfig
from guardproxy.policy.source import one_line
from guardproxy.reload import Reloader
from guardproxy.upstream import UpstreamApp

POLICY_ENV = "GUARDPROXY_POLICY"
UPSTREAM_ENV = "GUARDPROXY_UPSTREAM_URL"  # set by ``serve --upstream`` / ``--demo``
ADMIN_ENV = "GUARDPROXY_ADMIN_ADDRESS"   # set by ``serve``: the admin listener, HOST:PORT
WATCH_ENV = "GUARDPROXY_WATCH_INTERVAL"  # ``serve --watch-interval``: seconds, 0: off
READY_TIMEOUT = 1.0   # seconds /readyz waits for the state store's PING
WATCH_INTERVAL = 1.0  # seconds between two looks at the policy files
_PINNED = "guardproxy.upstream"   # scope key: the UpstreamApp of the request's policy
_WILDCARD = ("0.0.0.0", "::", "")


class Upstreams:
    """The proxy's inner app. Each request goes through the ``UpstreamApp`` of the policy
    it started under (pinned in its scope by ``ProxyApp``), so a reload that changes
    ``upstream:`` never sends a request in flight elsewhere; a replaced one closes its
    connections when its last request is over."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.current = UpstreamApp(config)
        self._busy: dict[UpstreamApp, int] = {}
        self._retired: weakref.WeakSet[UpstreamApp] = weakref.WeakSet()
        self._closing: set[asyncio.Task[None]] = set()

    def use(self, config: UpstreamConfig) -> None:
        """Forward new requests per ``config`` (the same config: the same connections)."""
        if config == self.current.config:
            return
        old, self.current = self.current, UpstreamApp(config)
        self._retired.add(old)
        if not self._busy.get(old):
            self._close_soon(old)

    def _close_soon(self, app: UpstreamApp) -> None:
        try:
            task = asyncio.get_running_loop().create_task(app.aclose())
        except RuntimeError:   # no loop: nothing was ever opened on one
            return
        self._closing.add(task)   # held until done: the loop keeps weak references
        task.add_done_callback(self._closing.discard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app: UpstreamApp = scope.get(_PINNED) or self.current
        self._busy[app] = self._busy.get(app, 0) + 1
        try:
            await app(scope, receive, send)
        finally:
            left = self._busy.pop(app) - 1
            if left:
                self._busy[app] = left
            elif app in self._retired:
                self._close_soon(app)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for app in [self.current, *self._retired]:
                    await app.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class ProxyApp:
    """The proxy. ``prepare`` turns every policy read from the file (at a reload) into
    the one served (``app_from_env``: the ``--upstream`` override); ``watch``: seconds
    between looks at the policy files, None: no watcher."""

    def __init__(self, policy: Policy, *, prepare: Callable[[Policy], Policy] | None = None,
                 watch: float | None = WATCH_INTERVAL) -> None:
        self.policy = policy
        self.upstreams = Upstreams(policy.upstream)
        self.guarded = GuardMiddleware(self.upstreams, policy)
        metrics = metrics_for(self.guarded.state)
        self.reloader = Reloader(policy, self.swap, prepare=_servable(prepare),
                                 interval=watch, report=metrics.metrics.reloaded)
        metrics.metrics.loaded(self.reloader.version)
        self.metrics: ASGIApp = metrics_app(metrics)
        self.admin = self._admin(policy)
        # the admin listener's bound (host, port), set by ``guardproxy serve``
        self.admin_address: tuple[str, int] | None = None

    @property
    def upstream(self) -> UpstreamApp:
        """The upstream new requests go to."""
        return self.upstreams.current

    def _admin(self, policy: Policy) -> AdminApp | None:
        if not policy.admin_token:
            return None
        return AdminApp(self.guarded, policy.admin_token, reloader=self.reloader)

    def swap(self, policy: Policy) -> None:
        """Serve ``policy`` from the next request on, whole. Raises ``ValueError``, and
        changes nothing, when it changes ``state``, ``key_prefix`` or ``admin.listen``
        (those need a restart). Synchronous: no request starts in between."""
        if policy.admin_listen != self.policy.admin_listen:
            raise ValueError("a reload cannot change 'admin.listen': restart")
        self.guarded.swap(policy)   # raises before it changes anything
        self.upstreams.use(policy.upstream)
        if policy.admin_token != self.policy.admin_token:
            self.admin = self._admin(policy)
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self._on_admin_listener(scope):   # never the proxy, whatever the path
            await self._admin_listener(scope, receive, send)
            return
        if kind == "http":
            path = scope["path"]
            if path in ("/healthz", "/readyz"):
                await self.health(path, send)
                return
            separate = self.policy.admin_listen is not None
            if path == "/metrics":
                await (_not_found if separate else self.metrics)(scope, receive, send)
                return
            if path.startswith("/admin/") and (separate or self.admin is not None):
                await (_not_found if separate else self.admin or _not_found)(
                    scope, receive, send)
                return
        # read here and in the middleware in the same step: one policy per request
        await self.guarded({**scope, _PINNED: self.upstreams.current}, receive, send)

    def _on_admin_listener(self, scope: Scope) -> bool:
        address, server = self.admin_address, scope.get("server")
        if address is None or not server:
            return False
        host, port = address
        return bool(server[1] == port and (host in _WILDCARD or server[0] == host))

    async def _admin_listener(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["type"] != "http":   # a WebSocket: refused at the handshake
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
        elif path in ("/healthz", "/readyz"):
            await self.health(path, send)
        elif path == "/metrics":
            await self.metrics(scope, receive, send)
        elif path.startswith("/admin/"):
            await (self.admin or _not_found)(scope, receive, send)
        else:
            await _json(send, 404, {"error": "the admin listener serves /admin, /metrics, "
                                             "/healthz and /readyz"})

    async def health(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await _json(send, 200, {"status": "ok"})
        else:
            status, body = await self.readiness()
            await _json(send, status, body)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """(200 or 503, body) for /readyz; never raises."""
        body: dict[str, Any] = {"status": "ready", "version": self.reloader.version}
        state = self.guarded.state
        if state.redis is None:
            return 200, {**body, "store": "memory"}
        try:
            await asyncio.wait_for(state.redis.ping(), READY_TIMEOUT)
        except Exception:  # down, refused, timed out: the reason stays in the logs
            if all(rule.on_store_error == "allow" for rule in self.policy.rules):
                return 200, {**body, "store": "unreachable",
                             "serving": "every rule has on_store_error: allow"}
            return 503, {**body, "status": "unready", "store": "unreachable"}
        return 200, {**body, "store": "ok"}

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.reloader.aclose()   # no swap while the state closes
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.reloader.start()
            elif message["type"] == "lifespan.shutdown.complete":
                worker_exited(os.getpid())   # multiprocess metrics: drop this one's gauges
            await send(message)

        await self.guarded(scope, receiving, sending)


def _servable(prepare: Callable[[Policy], Policy] | None) -> Callable[[Policy], Policy]:
    def run(policy: Policy) -> Policy:
        policy = prepare(policy) if prepare is not None else policy
        if not policy.upstream.url:
            raise ValueError("upstream.url is required to serve a proxy")
        return policy

    return run


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 404, {"error": "not found"})


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": data})


def create_app(policy: str | Path | Policy, *,
               prepare: Callable[[Policy], Policy] | None = None,
               watch: float | None = WATCH_INTERVAL) -> ProxyApp:
    """The standalone proxy. Raises ``ValueError`` when the policy names no upstream URL
    (``upstream.url`` is optional only when embedding)."""
    loaded = policy if isinstance(policy, Policy) else load_policy(policy)
    if not loaded.upstream.url:
        raise ValueError(f"{loaded.source}: upstream.url is required to serve a proxy")
    return ProxyApp(loaded, prepare=prepare, watch=watch)


def _upstream_override(policy: Policy) -> Policy:
    url = os.environ.get(UPSTREAM_ENV)
    if not url:
        return policy
    return replace(policy, upstream=replace(policy.upstream, url=url.rstrip("/")))


def app_from_env() -> ProxyApp:
    """uvicorn factory (``--factory``): every worker loads the policy named in the env
    (and reloads it from there), with the ``--upstream`` override, the watch interval
    and the admin listener's address ``serve`` put there."""
    try:
        policy = load_policy(os.environ[POLICY_ENV])
    except PolicyError as exc:
        # a worker uvicorn starts (SIGHUP, or one died) on a broken file: one line per
        # problem, no traceback. Not uvicorn's STARTUP_FAILURE (3): that would stop
        # every worker; 1 lets the others serve while uvicorn retries this one
        for problem in exc.problems:
            print(one_line(str(problem)), file=sys.stderr)
        sys.exit(1)
    watch = float(os.environ.get(WATCH_ENV) or WATCH_INTERVAL)
    app = create_app(_upstream_override(policy), prepare=_upstream_override,
                     watch=watch or None)
    admin = os.environ.get(ADMIN_ENV)
    if admin:
        host, _, port = admin.rpartition(":")
        app.admin_address = host.strip("[]"), int(port)
    return app
