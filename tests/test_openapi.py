"""``GET /admin/openapi.json``: a structurally valid OpenAPI 3.1 document that describes
every endpoint guardproxy/admin.py documents, each of which answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import guardproxy.admin
from guardproxy.app import create_app
from guardproxy.explain.openapi import document
from tests.conftest import write_policy
from tests.test_explain import BODY, LINKAGE, SECRET

ADMIN = {"authorization": "Bearer s3cret"}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
OPEN = ("/healthz", "/readyz", "/metrics")   # no token: probes and the scraper
RULES = f"""
admin: {{token: s3cret}}
rules:
  - name: tokens
    budget: 100000/day
  - name: hydra
    linkage: {{max_accounts: 5}}
  - name: marks
    canary: {{secret: {SECRET}}}
"""


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    yield create_app(write_policy(tmp_path, LINKAGE + RULES), watch=None)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p")


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


async def test_the_served_document_is_structurally_valid_openapi_3_1(app: Any) -> None:
    async with client(app) as c:
        served = await c.get("/admin/openapi.json", headers=ADMIN)
        anonymous = await c.get("/admin/openapi.json")
    assert (served.status_code, anonymous.status_code) == (200, 401)
    doc = served.json()
    assert doc == document()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and isinstance(doc["info"]["version"], str)
    scheme = doc["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"adminToken": []}]
    for ref in refs(doc):
        resolve(doc, ref)
    found = list(operations(doc))
    assert found
    for path, method, op in found:
        where = f"{method.upper()} {path}"
        assert path.startswith("/") and op["summary"], where
        assert op["responses"] and all(re.fullmatch(r"[1-5]\d\d", code)
                                       for code in op["responses"]), where
        for response in op["responses"].values():
            body = resolve(doc, response["$ref"]) if "$ref" in response else response
            assert body["description"], where
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), where
        assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
        if path.startswith("/admin/"):
            assert "security" not in op and "401" in op["responses"], where
        else:
            assert op["security"] == [], where


def documented() -> set[tuple[str, str]]:
    """(method, path) of every endpoint admin.py's docstring lists."""
    doc = guardproxy.admin.__doc__ or ""
    out = set()
    for methods, target in re.findall(r"^\s*((?:GET|POST)(?:\|(?:GET|POST))*)\s+(/admin/\S+)",
                                      doc, re.M):
        for method in methods.split("|"):
            out.add((method.lower(), target.split("?")[0]))
    return out


def test_every_endpoint_admin_py_documents_is_described_and_no_other() -> None:
    described = {(m, p) for p, m, _ in operations(document()) if p.startswith("/admin/")}
    assert len(documented()) >= 10
    assert documented() == described


async def test_every_described_path_answers(app: Any) -> None:
    async with client(app) as c:
        for path, method, _ in operations(document()):
            url = path.replace("{account}", "alice")
            content: dict[str, Any] = {}
            if method == "post":
                content = {"json": BODY} if path == "/admin/explain" else \
                    {"content": b"some leaked text, long enough to look at"}
            if path == "/admin/canary/detect":
                url += "?null_keys=1"
            anonymous = await c.request(method.upper(), url, **content)
            with_token = await c.request(method.upper(), url, headers=ADMIN, **content)
            where = f"{method.upper()} {path}"
            if path in OPEN:
                assert anonymous.status_code in (200, 503), where
                continue
            assert anonymous.status_code == 401, where
            assert with_token.status_code not in (401, 404, 405), (where, with_token.text)
    assert {p for p, _, _ in operations(document()) if not p.startswith("/admin/")} == set(OPEN)
