"""Operator endpoints, read-only:

    GET  /admin/usage/{account}                 each budget's used / reserved / remaining
    POST /admin/canary/detect?null_keys=200&population=N
                                                body: leaked text -> canary verdict
    POST /admin/ledger/match?limit=20&common=1000
                                                body: leaked text -> ledger matches
    GET  /admin/linkage/{account}               its cluster: members, and the evidence
                                                behind every link (never raw values)
    POST /admin/linkage/{account}/block         add to / remove from the linkage blocklist
    POST /admin/linkage/{account}/unblock
    GET  /admin/policy                          the policy in force: version, source
                                                hashes, load time, reload counts, errors
    POST /admin/reload                          re-read the policy files and swap: 200
                                                {"reloaded": true, "version"}, or 422 with
                                                "errors" (FILE:LINE lines; old policy kept)
    GET|POST /admin/explain?account=A&ip=IP     body: REQUEST.json (optional) -> what the
                                                proxy would do with it; nothing counted
    GET  /admin/openapi.json                    the OpenAPI 3.1 description of all these

The canary and ledger endpoints are what ``guardproxy canary detect`` and ``guardproxy
ledger match`` do, here because a ``memory://`` ledger lives only inside the proxy
process. Admin endpoints exist only when ``admin.token`` is set in the policy, and every
call must carry it as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from starlette.types import Receive, Scope, Send

from guardproxy.canary.detect import AccountIndex, detect
from guardproxy.canary.ledger import COMMON, LIMIT, match
from guardproxy.canary.settings import known_accounts, population_of
from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.explain.engine import ExplainError, ExplainRequest
from guardproxy.explain.engine import explain as dry_run
from guardproxy.explain.openapi import document
from guardproxy.flow import Pipeline
from guardproxy.guards.budget import BudgetGuard
from guardproxy.guards.canary import CanaryGuard
from guardproxy.linkage.api import LinkageStore
from guardproxy.middleware import GuardMiddleware

if TYPE_CHECKING:
    from guardproxy.reload import Reloader

MAX_TEXT_BYTES = 4 << 20


async def usage_report(pipeline: Pipeline, account_id: str) -> dict[str, Any] | None:
    """Each budget's used / reserved / remaining / reset for one account, or None."""
    account = pipeline.identifier.by_id.get(account_id)
    if account is None:
        return None
    probe = Exchange(method="POST", path="", headers={}, client_ip="", account=account)
    per_account = {"account", "org", "tier"}
    budgets = []
    for guard in pipeline.guards:
        if not isinstance(guard, BudgetGuard):
            continue
        key = guard.key(probe)
        entry: dict[str, Any] = {"rule": guard.rule.name, "per": list(guard.rule.per),
                                 "mode": guard.rule.mode}
        if not set(guard.rule.per) <= per_account:
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


async def linkage_report(store: LinkageStore, account: str) -> dict[str, Any]:
    """``account``'s cluster, its members and every link's evidence (signal, weight,
    first/last seen): the digests and raw values never leave the store."""
    cluster = await store.cluster(account)
    links = await store.links(account)
    blocked = set(await store.blocked())
    return {"account": account, "blocked": account in blocked,
            "cluster": {"id": cluster.id, "size": cluster.size,
                        "linked_to_blocked": cluster.linked_to_blocked},
            "members": await store.members(account),
            "links": [{"a": link.a, "b": link.b, "weight": link.weight,
                       "evidence": [{"signal": e.signal, "weight": e.weight,
                                     "first_seen": e.first_seen, "last_seen": e.last_seen}
                                    for e in link.evidence]} for link in links]}


class AdminApp:
    def __init__(self, guarded: GuardMiddleware, token: str, *,
                 reloader: Reloader | None = None) -> None:
        self.guarded = guarded
        self.reloader = reloader   # None: /admin/reload and /admin/policy answer 404
        self.token = token.encode()
        # built on first use (one HMAC per account), again only after a policy reload
        self._accounts: tuple[object, AccountIndex] | None = None

    @property
    def pipeline(self) -> Pipeline:
        """The policy in force now (a reload swaps it)."""
        return self.guarded.pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            await _json(send, 401, {"error": "admin token required"})
            return
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        if len(parts) == 2 and parts[1] in ("reload", "policy"):
            await self.policy_route(parts[1], method, send)
            return
        if len(parts) == 2 and parts[1] in ("explain", "openapi.json"):
            await (self.explain(scope, receive, send) if parts[1] == "explain"
                   else self.openapi(method, send))
            return
        if len(parts) >= 3 and parts[1] == "linkage":
            await self.linkage(scope, send)
            return
        if method == "GET" and len(parts) == 3 and parts[1] == "usage":
            report = await usage_report(self.pipeline, parts[2])
            if report is None:
                await _json(send, 404, {"error": f"unknown account {parts[2]!r}"})
            else:
                await _json(send, 200, report)
            return
        route = {("canary", "detect"): self.canary_detect,
                 ("ledger", "match"): self.ledger_match}.get(tuple(parts[1:]))
        if route is None:
            await _json(send, 404, {"error": "not found"})
            return
        if method != "POST":
            await _json(send, 405, {"error": "use POST with the text as the body"})
            return
        text = await _read_text(receive)
        if text is None:
            await _json(send, 413, {"error": f"text larger than {MAX_TEXT_BYTES} bytes"})
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        try:
            status, body = await route(text, query)
        except ValueError as exc:
            status, body = 400, {"error": str(exc)}
        await _json(send, status, body)

    async def policy_route(self, name: str, method: str, send: Send) -> None:
        """GET /admin/policy, POST /admin/reload (guardproxy/reload.py)."""
        reloader = self.reloader
        if reloader is None:
            await _json(send, 404, {"error": "this server does not reload its policy"})
            return
        if (name, method) not in (("policy", "GET"), ("reload", "POST")):
            await _json(send, 405, {"error": "GET /admin/policy, POST /admin/reload"})
            return
        if name == "reload":
            result = await reloader.reload()
            await _json(send, 200 if result.ok else 422,
                        {"reloaded": result.ok, "version": result.version,
                         "errors": list(result.errors)})
            return
        policy = reloader.policy
        keys_file = policy.accounts.keys_file
        await _json(send, 200, {
            "version": reloader.version, "source": str(policy.source),
            "source_sha256": reloader.source_sha256,
            "accounts_file": str(keys_file) if keys_file is not None else None,
            "accounts_sha256": reloader.accounts_sha256 or None,
            "loaded_at": reloader.loaded_at, "rules": [r.name for r in policy.rules],
            "reloads": {"ok": reloader.reloads_ok, "failed": reloader.reloads_failed},
            "last_errors": list(reloader.last_errors),
            "pid": os.getpid()})   # with --workers N: which worker answered

    async def linkage(self, scope: Scope, send: Send) -> None:
        """GET /admin/linkage/{account}, POST /admin/linkage/{account}/block|unblock."""
        enricher = self.guarded.linkage
        if enricher is None:
            await _json(send, 404, {"error": "the policy has no linkage section"})
            return
        # the raw path, so that an account id may hold an escaped "/"
        raw = bytes(scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
        parts = [unquote(p.decode("latin-1")) for p in raw.strip(b"/").split(b"/")]
        if len(parts) not in (3, 4) or parts[1] != "linkage":
            await _json(send, 404, {"error": "not found"})
            return
        account, action = parts[2], (parts[3] if len(parts) > 3 else None)
        if not account or action not in (None, "block", "unblock"):
            await _json(send, 404, {"error": "not found"})
            return
        if (scope["method"] == "GET") != (action is None):
            await _json(send, 405, {"error": "GET the cluster; POST block or unblock"})
            return
        store = enricher.store
        try:
            if action is not None:
                await store.block(account, action == "block")
            body = await linkage_report(store, account)
        except StoreError as exc:
            await _json(send, 503, {"error": f"linkage store unavailable: {exc}"})
            return
        await _json(send, 200, body)

    def _canaries(self) -> list[CanaryGuard]:
        return [g for g in self.pipeline.guards if isinstance(g, CanaryGuard)]

    async def canary_detect(self, text: str,
                            query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        guards = self._canaries()
        if not guards:
            return 404, {"error": "the policy has no canary rule"}
        null_keys = _int_param(query, "null_keys", 200, 0, 1000)
        population = (_int_param(query, "population", 1, 1, 2**63 - 1)
                      if "population" in query else None)
        keys = guards[0].keys
        policy = self.pipeline.policy
        # scoring is CPU work: keep it off the event loop that is proxying requests
        if self._accounts is None or self._accounts[0] is not policy:
            accounts = await asyncio.to_thread(known_accounts, policy)
            self._accounts = policy, await asyncio.to_thread(AccountIndex, keys, accounts)
        index = self._accounts[1]
        population_of(index.count, population)   # ValueError: 400, before any scoring
        verdict = await asyncio.to_thread(detect, keys, [text], index, null_keys, population)
        return 200, verdict.as_dict()

    async def ledger_match(self, text: str,
                           query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        ledgers = {id(g.ledger): g.ledger for g in self._canaries() if g.ledger is not None}
        if not ledgers:
            return 404, {"error": "no canary rule keeps a ledger"}
        _int_param(query, "max_distance", 6, 0, 64)  # SimHash-era; accepted, unused
        limit = _int_param(query, "limit", LIMIT, 1, 1000)
        common = _int_param(query, "common", COMMON, 1, 2**31)
        found = [m for ledger in ledgers.values()
                 for m in await match(ledger, text, common=common, limit=limit)]
        found.sort(key=lambda m: m.log10_p)
        return 200, {"matches": [m.as_dict() for m in found[:limit]]}

    async def explain(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET|POST /admin/explain?account=&ip=&model=, body REQUEST.json or none (then
        ``{"model": model}`` or ``{}`` on the chat endpoint): guardproxy/explain/."""
        if scope["method"] not in ("GET", "POST"):
            await _json(send, 405, {"error": "GET or POST /admin/explain"})
            return
        text = await _read_text(receive)
        if text is None:
            await _json(send, 413, {"error": f"body larger than {MAX_TEXT_BYTES} bytes"})
            return
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        # read together, no await between: the policy and its linkage store agree
        pipeline, enricher = self.pipeline, self.guarded.linkage
        try:
            doc = json.loads(text) if text.strip() else (
                {"model": query["model"]} if "model" in query else {})
            report = await dry_run(pipeline, ExplainRequest.from_json(doc, pipeline.dialect),
                                   account=query.get("account"), ip=query.get("ip"),
                                   linkage=enricher.store if enricher is not None else None)
        except (ValueError, RecursionError) as exc:   # not JSON, bad envelope, unknown id
            status = exc.status if isinstance(exc, ExplainError) else 400
            await _json(send, status, {"error": str(exc) or "body nested too deeply"})
            return
        await _json(send, 200, report)

    async def openapi(self, method: str, send: Send) -> None:
        """GET /admin/openapi.json (guardproxy/explain/openapi.py)."""
        if method != "GET":
            await _json(send, 405, {"error": "GET /admin/openapi.json"})
            return
        await _json(send, 200, document())


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int,
               high: int) -> int:
    raw = query.get(name, [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


async def _read_text(receive: Receive) -> str | None:
    """The request body as text, or None when it is larger than MAX_TEXT_BYTES."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_TEXT_BYTES:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks).decode("utf-8", errors="replace")


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
