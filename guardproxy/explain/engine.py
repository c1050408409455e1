"""Explain one request against a pipeline without forwarding or counting anything.

REQUEST.json is either the request body alone (then the request is ``POST`` to the
dialect's chat endpoint: ``/v1/chat/completions`` for OpenAI, ``/v1/messages`` for
Anthropic) or an envelope ``{"method": "POST", "path": "/v1/…", "headers": {…},
"body": {…}}`` (every key optional; ``body`` an object, a string of raw bytes, or
null). The report::

    {"rules": [{"name", "kind", "mode", "matches", "decision", "why", "reached",
                "status"?, "window"?, "marks"?, "key"?, "windows"?, "cluster"?, …}],
     "forwarded_body": {…} | null,   # after every reached rule's body changes
     "allowed": bool, "status": int | null, "denied_by": str | null, "why": str,
     "marked": bool, "unguarded": bool, "request": {method, path, endpoint, model,
     stream}, "account": {id, org, tier} | null, "client_ip": str,
     "cluster": {id, size, linked_to_blocked} | null, "notes": [str]}

Rules are explained in the order the pipeline asks them (phase, then file order). The
pipeline stops at the first enforced denial: later rules are explained all the same,
with ``"reached": false``, and their body changes are not in ``forwarded_body``.
``status`` is the proxy's own answer when it would refuse (401, 400, 413, 415, a
rule's 429/403/503), null when the request would be forwarded.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guardproxy.dialects.base import Dialect
from guardproxy.errors import AuthenticationError, RequestError, StoreError
from guardproxy.exchange import Exchange
from guardproxy.explain.verdict import DENY, RuleExplanation, allowed, denied
from guardproxy.flow import Pipeline
from guardproxy.guards import Guard
from guardproxy.guards.per import CLUSTER, CLUSTER_ERROR
from guardproxy.identity.keys import hash_key
from guardproxy.linkage.api import LinkageStore
from guardproxy.policy.match import Pattern
from guardproxy.policy.model import Account
from guardproxy.request.body import parse_json
from guardproxy.request.path import normalize_path

DEFAULT_IP = "127.0.0.1"
ENVELOPE = frozenset({"method", "path", "headers", "body"})
CHAT_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
UNKNOWN = "unknown"   # a rule kind without an ``explain`` method (an embedder's own)
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
_LINKAGE_NOTE = ("the cluster is read as the linkage store has it now; this request's own "
                 "evidence is not recorded, so a link it would make is not foreseen")


class ExplainError(ValueError):
    """REQUEST.json or the identity cannot be explained; ``status``: 404 for an unknown
    account or key, 400 for a bad REQUEST.json."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExplainRequest:
    method: str
    path: str                              # as sent (normalised like the proxy does)
    headers: tuple[tuple[str, str], ...]   # lower-case names
    body: bytes | None

    @classmethod
    def from_json(cls, doc: Any, dialect: Dialect) -> ExplainRequest:
        """A body alone, or the envelope (see the module docstring). Raises
        ``ExplainError``."""
        if not (isinstance(doc, dict) and doc and set(doc) <= ENVELOPE):
            return cls("POST", chat_path(dialect), (), json.dumps(doc).encode())
        method, path = doc.get("method", "POST"), doc.get("path", chat_path(dialect))
        headers, body = doc.get("headers") or {}, doc.get("body")
        if not isinstance(method, str) or not method.isalpha():
            raise ExplainError("'method' must be an HTTP method such as POST")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ExplainError("'path' must be a path starting with '/'")
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ExplainError("'headers' must be an object of strings")
        raw = body.encode() if isinstance(body, str) else (
            None if body is None else json.dumps(body).encode())
        return cls(method.upper(), path, tuple((k.lower(), v) for k, v in headers.items()),
                   raw)


def chat_path(dialect: Dialect) -> str:
    return CHAT_PATHS.get(dialect.name, "/v1" + dialect.endpoints[0][0])


async def explain(pipeline: Pipeline, request: ExplainRequest, *, account: str | None = None,
                  key: str | None = None, ip: str | None = None,
                  linkage: LinkageStore | None = None) -> dict[str, Any]:
    """The report of the module docstring. The identity is ``account`` (an id), else
    ``key`` (an API key, hashed as the proxy does), else the request's headers;
    ``ip`` is the client address the rules see (default 127.0.0.1), taken as the
    peer. ``linkage``: the store the policy's clusters live in. Raises
    ``ExplainError`` for an unknown account or key, or both given."""
    if account is not None and key is not None:
        raise ExplainError("give an account or a key, not both")
    client = ip or DEFAULT_IP
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise ExplainError(f"not an IP address: {client!r}") from None
    headers: dict[str, str] = {}
    for name, value in request.headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    exchange = Exchange(method=request.method, path="", headers=headers, client_ip=client,
                        peer_trusted=pipeline.identifier.peer_trusted(client))
    report: dict[str, Any] = {"rules": [], "forwarded_body": None, "allowed": False,
                              "status": None, "denied_by": None, "why": "", "marked": False,
                              "unguarded": False, "request": {}, "account": None,
                              "client_ip": client, "cluster": None, "notes": []}
    try:
        target = request.path.split("?", 1)[0]   # the query is not part of the path
        exchange.path = normalize_path(target.encode("utf-8", "surrogateescape"))[0]
        if Pattern.compile(pipeline.policy.unguarded, glob=True)(exchange.path):
            exchange.body = request.body
            return _finish(report, exchange, [], unguarded=True)
        exchange.account = _identity(pipeline, exchange, account, key)
        _read(pipeline, exchange, request.body)
    except (RequestError, AuthenticationError) as exc:
        return _refused(report, exchange, exc.status, exc.message)
    except RecursionError:   # JSON nested deeper than the guards can walk
        return _refused(report, exchange, 400, "Request body is nested too deeply.")
    if linkage is not None and pipeline.policy.linkage is not None and exchange.account:
        report["notes"].append(_LINKAGE_NOTE)
        try:
            exchange.notes[CLUSTER] = cluster = await linkage.cluster(exchange.account.id)
            report["cluster"] = {"id": cluster.id, "size": cluster.size,
                                 "linked_to_blocked": cluster.linked_to_blocked}
        except StoreError as exc:   # the rules on the cluster meet it: on_store_error
            exchange.notes[CLUSTER_ERROR] = exc
    explained: list[tuple[RuleExplanation, bool]] = []
    shaped: bytes | None = None   # the body when the first enforced denial stopped it
    for guard in pipeline.guards:
        try:
            found = await _ask(guard, exchange)
        except RecursionError:
            return _refused(report, exchange, 400, "Request body is nested too deeply.")
        explained.append((found, shaped is None))
        if found.enforced_denial and shaped is None:
            shaped = exchange.forwarded_body() if exchange.body is not None else b""
    return _finish(report, exchange, explained, shaped=shaped)


async def _ask(guard: Guard, exchange: Exchange) -> RuleExplanation:
    rule = guard.rule
    method = getattr(guard, "explain", None)
    if method is None:
        return RuleExplanation(rule, matches=False, decision=UNKNOWN,
                               why=f"the {rule.kind!r} rule kind cannot explain itself")
    try:
        found: RuleExplanation = await method(exchange)
    except StoreError as exc:
        if rule.on_store_error == "allow":
            return allowed(rule, f"store unavailable ({exc}); on_store_error: allow lets "
                                 "the rule pass")
        return denied(rule, f"store unavailable ({exc}); on_store_error: deny", 503)
    return found


def _identity(pipeline: Pipeline, exchange: Exchange, account: str | None,
              key: str | None) -> Account:
    """As ``Identifier.account``; raises ``ExplainError`` or ``AuthenticationError``."""
    policy = pipeline.policy
    if account is not None:
        found = pipeline.identifier.by_id.get(account)
        if found is None and policy.accounts.trust_header:  # a gateway may name any id
            found = Account(id=account, org=account, tier="default")
        if found is None:
            raise ExplainError(f"unknown account {account!r}", 404)
        return found
    if key is not None:
        by_key = policy.keys.get(hash_key(key))
        if by_key is None:
            raise ExplainError("no account has this API key", 404)
        return by_key
    return pipeline.identifier.account(exchange.client_ip, exchange.headers)


def _read(pipeline: Pipeline, exchange: Exchange, body: bytes | None) -> None:
    """The middleware's ``_read_request`` on a body in hand (same checks, same plan).
    Raises ``RequestError`` where the proxy would answer 400/413/415."""
    headers, dialect = exchange.headers, pipeline.dialect
    generation = dialect.endpoint(exchange.path) is not None
    ctype = headers.get("content-type", "").lower()
    labelled_json = "json" in ctype
    if body is None or not (generation or labelled_json or not ctype
                            or ctype.startswith("text/plain")):
        return
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise RequestError("Compressed request bodies are not accepted.", status=415)
    limit = pipeline.policy.clients.max_body_bytes
    if len(body) > limit:
        raise RequestError(f"Request body exceeds {limit} bytes.", status=413)
    exchange.body = body
    if not body and (exchange.method in _NO_BODY or not generation):
        return
    try:
        parsed = parse_json(body)
    except RequestError:
        # unlabelled, off the generation endpoints: refused only when Python's json
        # reads it (an upstream would, otherwise than the proxy)
        if generation or labelled_json or _lenient_json(body):
            raise
        return
    if not isinstance(parsed, dict):
        if generation:
            raise RequestError("Request body must be a JSON object.")
        return
    exchange.json = parsed
    exchange.plan = dialect.plan(exchange.path, parsed, pipeline.policy.upstream)


def _lenient_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _refused(report: dict[str, Any], exchange: Exchange, status: int,
             message: str) -> dict[str, Any]:
    report.update(status=status, why=f"refused before any rule ({status}): {message}",
                  request=_request(exchange))
    _account(report, exchange)
    return report


def _finish(report: dict[str, Any], exchange: Exchange,
            explained: list[tuple[RuleExplanation, bool]], *, unguarded: bool = False,
            shaped: bytes | None = None) -> dict[str, Any]:
    denial = next((e for e, reached in explained if reached and e.enforced_denial), None)
    body = shaped if shaped is not None else (
        exchange.forwarded_body() if exchange.body is not None else None)
    marking = [e.rule.name for e, reached in explained if reached and e.marks]
    report.update(
        rules=[{**e.as_dict(), "reached": reached} for e, reached in explained],
        forwarded_body=_decoded(body), allowed=denial is None, unguarded=unguarded,
        marked=denial is None and bool(marking), request=_request(exchange))
    _account(report, exchange)
    if body and report["forwarded_body"] is None:
        report["forwarded_bytes"] = len(body)
    if unguarded:
        report["why"] = "the path is unguarded: passed through without any rule"
    elif denial is not None:
        report.update(status=denial.status, denied_by=denial.rule.name,
                      why=f"denied by rule {denial.rule.name!r} ({denial.status}): "
                          f"{denial.why}")
    else:
        shadow = [e.rule.name for e, _ in explained if e.decision == DENY]
        report["why"] = "forwarded upstream" + (
            f"; the response would be marked by {', '.join(marking)}" if marking else "") + (
            f"; shadow rules that would deny: {', '.join(shadow)}" if shadow else "")
    return report


def _request(exchange: Exchange) -> dict[str, Any]:
    plan = exchange.plan
    return {"method": exchange.method, "path": exchange.path, "endpoint": plan.endpoint,
            "model": exchange.model, "stream": plan.stream}


def _account(report: dict[str, Any], exchange: Exchange) -> None:
    acct = exchange.account
    if acct is not None:
        report["account"] = {"id": acct.id, "org": acct.org, "tier": acct.tier}


def _decoded(body: bytes | None) -> Mapping[str, Any] | None:
    """The forwarded body as JSON, None when there is none or it is not a JSON object."""
    if not body:
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


__all__ = ["ExplainError", "ExplainRequest", "chat_path", "explain"]
