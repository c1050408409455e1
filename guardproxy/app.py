"""The standalone proxy: ``GuardMiddleware`` around ``UpstreamApp``, plus ``/healthz``."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from guardproxy.admin import AdminApp
from guardproxy.middleware import GuardMiddleware
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy
from guardproxy.upstream import UpstreamApp

POLICY_ENV = "GUARDPROXY_POLICY"
UPSTREAM_ENV = "GUARDPROXY_UPSTREAM_URL"  # set by ``serve --upstream`` / ``--demo``
_HEALTH = b'{"status":"ok"}'


class ProxyApp:
    """Routes ``/healthz`` and ``/admin/*`` locally, everything else through the guards."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.upstream = UpstreamApp(policy.upstream)
        self.guarded = GuardMiddleware(self.upstream, policy)
        self.admin: ASGIApp | None = (AdminApp(self.guarded, policy.admin_token)
                                      if policy.admin_token else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.admin and scope["path"].startswith("/admin/"):
            await self.admin(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(_HEALTH)).encode())]})
            await send({"type": "http.response.body", "body": _HEALTH})
            return
        await self.guarded(scope, receive, send)


def create_app(policy: str | Path | Policy) -> ProxyApp:
    """The standalone proxy. Raises ``ValueError`` when the policy names no upstream URL
    (``upstream.url`` is optional only when embedding)."""
    loaded = policy if isinstance(policy, Policy) else load_policy(policy)
    if not loaded.upstream.url:
        raise ValueError(f"{loaded.source}: upstream.url is required to serve a proxy")
    return ProxyApp(loaded)


def app_from_env() -> ProxyApp:
    """uvicorn factory (``--factory``): every worker loads the policy named in the env."""
    policy = load_policy(os.environ[POLICY_ENV])
    if os.environ.get(UPSTREAM_ENV):
        upstream = replace(policy.upstream, url=os.environ[UPSTREAM_ENV].rstrip("/"))
        policy = replace(policy, upstream=upstream)
    return create_app(policy)
