"""Read-only operator views: budget usage per account (``GET /admin/usage/{account}``).

Admin endpoints exist only when ``admin.token`` is set in the policy, and every call
must carry it as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import Receive, Scope, Send

from guardproxy.exchange import Exchange
from guardproxy.flow import Pipeline
from guardproxy.guards.budget import BudgetGuard


async def usage_report(pipeline: Pipeline, account_id: str) -> dict[str, Any] | None:
    """Each budget's used / reserved / remaining / reset for one account, or None."""
    account = pipeline.identifier.by_id.get(account_id)
    if account is None:
        return None
    probe = Exchange(method="POST", path="", headers={}, client_ip="", account=account)
    budgets = []
    for guard in pipeline.guards:
        if not isinstance(guard, BudgetGuard):
            continue
        key = guard.key(probe)
        entry: dict[str, Any] = {"rule": guard.rule.name, "per": list(guard.rule.per),
                                 "mode": guard.rule.mode}
        if key is None:
            entry["note"] = "counted per request attribute, not per account"
        else:
            entry["key"] = key
            entry["windows"] = [
                {"limit": w.limit, "seconds": s.seconds, "used": w.used,
                 "reserved": w.reserved, "remaining": w.remaining, "reset_at": w.reset_at}
                for s, w in zip(guard.settings.windows,
                                await pipeline.state.budgets.usage(guard.subject(key),
                                                                   guard.settings.windows),
                                strict=True)
            ]
        budgets.append(entry)
    return {"account": account.id, "org": account.org, "tier": account.tier,
            "budgets": budgets}


class AdminApp:
    def __init__(self, pipeline: Pipeline, token: str) -> None:
        self.pipeline = pipeline
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            await _json(send, 401, {"error": "admin token required"})
            return
        parts = scope["path"].strip("/").split("/")
        if scope["method"] == "GET" and len(parts) == 3 and parts[1] == "usage":
            report = await usage_report(self.pipeline, parts[2])
            if report is None:
                await _json(send, 404, {"error": f"unknown account {parts[2]!r}"})
            else:
                await _json(send, 200, report)
            return
        await _json(send, 404, {"error": "not found"})


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
