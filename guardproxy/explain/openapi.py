"""The OpenAPI 3.1 description of the operator endpoints, served at
``GET /admin/openapi.json`` (``document()``; built per call from constants).

Every ``/admin`` path needs ``Authorization: Bearer <admin.token>`` (the ``adminToken``
scheme); ``/healthz``, ``/readyz`` and ``/metrics`` need none. ``tests/test_openapi.py``
checks that every endpoint ``guardproxy/admin.py`` documents is described here and that
every path described here answers.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

_JSON = "application/json"
_ERROR = {"$ref": "#/components/schemas/Error"}
_ACCOUNT = {"name": "account", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "An account id (percent-encode a '/' in it)."}


def _ok(description: str, schema: dict[str, Any] | None = None,
        media: str = _JSON) -> dict[str, Any]:
    return {"description": description,
            "content": {media: {"schema": schema or {"type": "object"}}}}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ERROR}}}


def _query(name: str, description: str, kind: str = "integer") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind},
            "description": description}


def _op(summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    """One admin operation: 401 without the token, on top of its own responses."""
    return {"summary": summary, **more,
            "responses": {**responses, "401": {"$ref": "#/components/responses/Unauthorized"}}}


_TEXT_BODY = {"required": True, "description": "The leaked text (UTF-8, at most 4 MiB).",
              "content": {"text/plain": {"schema": {"type": "string"}}}}
_EXPLAIN_QUERY = [
    _query("account", "Explain as this account id (else the request's headers name it).",
           "string"),
    _query("ip", "The client address the rules see (default 127.0.0.1).", "string"),
    _query("model", "Without a body: the model of the minimal request explained.", "string"),
]
_EXPLAIN_BODY = {"required": False, "description": (
    "REQUEST.json: a request body (sent to the dialect's chat endpoint), or "
    "{method, path, headers, body}. Without a body: {\"model\": model} (or {}) on the chat "
    "endpoint."), "content": {_JSON: {"schema": {"type": "object"}}}}
_EXPLAIN_RESPONSES = {
    "200": _ok("What the proxy would do with the request; nothing counted, nothing sent.",
               {"$ref": "#/components/schemas/Explanation"}),
    "400": _err("The body is not JSON, or not a request the proxy can read."),
    "404": _err("Unknown account."),
    "413": _err("The body is larger than 4 MiB."),
}


def _admin_paths() -> dict[str, Any]:
    linkage = _ok("The account's cluster, members and every link's evidence (never raw "
                  "values).", {"$ref": "#/components/schemas/Linkage"})
    no_linkage = _err("The policy has no linkage section.")
    unavailable = _err("The linkage store is unavailable.")
    return {
        "/admin/usage/{account}": {"get": _op(
            "Each token budget's used / reserved / remaining / reset for one account",
            {"200": _ok("The account's budgets.", {"$ref": "#/components/schemas/Usage"}),
             "404": _err("Unknown account.")}, parameters=[_ACCOUNT])},
        "/admin/canary/detect": {"post": _op(
            "Score leaked text against every account's canary code",
            {"200": _ok("The canary verdict (account, score, p-value, calibration)."),
             "400": _err("A bad query parameter."), "404": _err("The policy has no canary rule."),
             "413": _err("The text is larger than 4 MiB.")},
            parameters=[_query("null_keys", "Random keys scored for calibration (0-1000, "
                                            "default 200)."),
                        _query("population", "Accounts the leak could come from (default: "
                                             "the accounts file's).")],
            requestBody=_TEXT_BODY)},
        "/admin/ledger/match": {"post": _op(
            "Find the ledger entries (responses served) that leaked text matches",
            {"200": _ok("Matches, most significant first."),
             "400": _err("A bad query parameter."),
             "404": _err("No canary rule keeps a ledger."),
             "413": _err("The text is larger than 4 MiB.")},
            parameters=[_query("limit", "Matches returned (1-1000, default 20)."),
                        _query("common", "Fingerprints held by more entries than this are "
                                         "ignored (default 1000)."),
                        _query("max_distance", "Accepted for compatibility, unused.")],
            requestBody=_TEXT_BODY)},
        "/admin/linkage/{account}": {"get": _op(
            "The account's linked cluster", {"200": linkage, "404": no_linkage,
                                             "503": unavailable}, parameters=[_ACCOUNT])},
        "/admin/linkage/{account}/block": {"post": _op(
            "Add the account to the linkage blocklist", {"200": linkage, "404": no_linkage,
                                                         "503": unavailable},
            parameters=[_ACCOUNT])},
        "/admin/linkage/{account}/unblock": {"post": _op(
            "Remove the account from the linkage blocklist",
            {"200": linkage, "404": no_linkage, "503": unavailable}, parameters=[_ACCOUNT])},
        "/admin/explain": {
            "get": _op("Explain a request (dry run): rules, decisions, forwarded body",
                       _EXPLAIN_RESPONSES, parameters=_EXPLAIN_QUERY),
            "post": _op("Explain the request in the body (dry run)", _EXPLAIN_RESPONSES,
                        parameters=_EXPLAIN_QUERY, requestBody=_EXPLAIN_BODY)},
        "/admin/policy": {"get": _op(
            "The policy in force: version, source hashes, load time, reload counts",
            {"200": _ok("{version (12 hex digits), source, source_sha256, accounts_file, "
                        "accounts_sha256, loaded_at, rules, reloads: {ok, failed}, "
                        "last_errors}"),
             "404": _err("This server does not reload its policy (embedded).")})},
        "/admin/reload": {"post": _op(
            "Re-read, validate and swap in the policy and accounts files",
            {"200": _ok("The new policy is in force: {reloaded: true, version, "
                        "errors: []}."),
             "404": _err("This server does not reload its policy (embedded)."),
             "422": _ok("The files were refused; the old policy stays: {reloaded: false, "
                        "version, errors: [\"FILE:LINE: …\"]}.")})},
        "/admin/openapi.json": {"get": _op(
            "This document", {"200": _ok("The OpenAPI 3.1 description of the admin API.")})},
    }


def _open_paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": {"summary": "Liveness: the process is up", "security": [],
                             "responses": {"200": _ok("{\"status\": \"ok\"}")}}},
        "/readyz": {"get": {"summary": "Readiness: a policy is loaded and the state store "
                                       "answers (or every rule may serve without it)",
                            "security": [],
                            "responses": {"200": _ok("{\"status\": \"ready\", …}"),
                                          "503": _ok("{\"status\": \"unready\", …}")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (names prefixed guardproxy_); "
                                        "on the admin listener when admin.listen is set",
                             "security": [],
                             "responses": {"200": _ok("Prometheus text exposition format.",
                                                      {"type": "string"}, "text/plain")}}},
    }


_RULE = {"type": "object", "required": ["name", "kind", "mode", "matches", "decision", "why"],
         "properties": {
             "name": {"type": "string"}, "kind": {"type": "string"},
             "mode": {"enum": ["enforce", "shadow"]}, "matches": {"type": "boolean"},
             "decision": {"enum": ["allow", "deny", "none", "unknown"]},
             "why": {"type": "string"}, "reached": {"type": "boolean"},
             "status": {"type": "integer"}, "window": {"type": "string"},
             "marks": {"type": "boolean"}, "key": {"type": "string"},
             "windows": {"type": "array", "items": {"type": "object"}},
             "cluster": {"type": "object"}}}
_EXPLANATION = {"type": "object", "required": ["rules", "forwarded_body"], "properties": {
    "rules": {"type": "array", "items": {"$ref": "#/components/schemas/RuleExplanation"}},
    "forwarded_body": {"type": ["object", "null"]},
    "allowed": {"type": "boolean"}, "status": {"type": ["integer", "null"]},
    "denied_by": {"type": ["string", "null"]}, "why": {"type": "string"},
    "marked": {"type": "boolean"}, "unguarded": {"type": "boolean"},
    "request": {"type": "object"}, "account": {"type": ["object", "null"]},
    "client_ip": {"type": "string"}, "cluster": {"type": ["object", "null"]},
    "notes": {"type": "array", "items": {"type": "string"}}}}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (``info.version``: the installed guardproxy's)."""
    try:
        version = metadata.version("guardproxy")
    except metadata.PackageNotFoundError:   # run from a source tree
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {"title": "guardproxy admin API", "version": version,
                 "description": "Operator endpoints. Present only when the policy sets "
                                "admin.token; with admin.listen, served only on that "
                                "address. Every /admin call carries the token as a bearer "
                                "token (compared in constant time)."},
        "security": [{"adminToken": []}],
        "paths": {**_admin_paths(), **_open_paths()},
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                               "description": "The policy's admin.token."}},
            "responses": {"Unauthorized": _err("No admin token, or a wrong one.")},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "Usage": {"type": "object", "properties": {
                    "account": {"type": "string"}, "org": {"type": "string"},
                    "tier": {"type": "string"},
                    "budgets": {"type": "array", "items": {"type": "object"}}}},
                "Linkage": {"type": "object", "properties": {
                    "account": {"type": "string"}, "blocked": {"type": "boolean"},
                    "cluster": {"type": "object"},
                    "members": {"type": "array", "items": {"type": "string"}},
                    "links": {"type": "array", "items": {"type": "object"}}}},
                "RuleExplanation": _RULE,
                "Explanation": _EXPLANATION,
            },
        },
    }
