"""``GET|POST /admin/explain``: the report ``guardproxy explain --json`` prints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from guardproxy.app import create_app
from guardproxy.cli import main
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.servers import running_server
from tests.test_explain import BODY, CHAT, chat, rule

ADMIN = {"authorization": "Bearer s3cret"}
RULES = """
admin: {token: s3cret}
rules:
  - name: free
    when: {tier: free}
    quota: 2/minute
  - name: tokens
    budget: 100000/day
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p")


async def test_admin_explain_get_and_post(tmp_path: Path, fake: str) -> None:
    app = create_app(write_policy(tmp_path, RULES, upstream=fake), watch=None)
    async with client(app) as c:
        for _ in range(2):
            assert (await c.post(CHAT, **chat("key-alice"))).status_code == 200
        posted = await c.post("/admin/explain?account=alice&ip=203.0.113.9", json=BODY,
                              headers=ADMIN)
        got = await c.get("/admin/explain?account=alice&model=m", headers=ADMIN)
        envelope = await c.post("/admin/explain", headers=ADMIN, json={
            "path": CHAT, "headers": {"authorization": "Bearer key-bob"}, "body": BODY})
        unauthorized = await c.post("/admin/explain?account=alice", json=BODY)
        unknown = await c.get("/admin/explain?account=zed", headers=ADMIN)
        not_json = await c.post("/admin/explain?account=alice", content=b"{x",
                                headers=ADMIN)
        wrong_method = await c.put("/admin/explain?account=alice", json=BODY, headers=ADMIN)
        still = await c.post(CHAT, **chat("key-carol"))
    assert posted.status_code == 200, posted.text
    report = posted.json()
    assert (report["denied_by"], report["status"], report["client_ip"]) == (
        "free", 429, "203.0.113.9")
    assert rule(report, "free")["decision"] == "deny"
    assert report["forwarded_body"] == BODY
    assert got.status_code == 200 and got.json()["denied_by"] == "free"
    assert got.json()["request"]["model"] == "m"
    bob = envelope.json()
    assert bob["account"]["id"] == "bob" and bob["allowed"]
    assert (unauthorized.status_code, unknown.status_code, not_json.status_code,
            wrong_method.status_code) == (401, 404, 400, 405)
    assert "zed" in unknown.json()["error"]
    assert still.status_code == 200


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """Without what the passing second changes (reset times, "resets in Ns")."""
    text = json.dumps(report)
    out: dict[str, Any] = json.loads(text)
    for entry in out["rules"]:
        entry.pop("why")
        for window in entry.get("windows", []):
            window.pop("reset_at")
    out.pop("why")
    return out


def test_admin_and_cli_print_the_same_report(tmp_path: Path, fake: str,
                                            redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    policy = write_policy(tmp_path, RULES, upstream=fake, state=url, key_prefix=prefix)
    with running_server(create_app(policy, watch=None)) as proxy:
        for _ in range(2):
            assert httpx.post(proxy + CHAT, timeout=10, **chat("key-alice")).status_code == 200
        served = httpx.post(proxy + "/admin/explain?account=alice", json=BODY, headers=ADMIN,
                            timeout=10).json()
    request = tmp_path / "request.json"
    request.write_text(json.dumps(BODY))
    printed = CliRunner().invoke(main, ["explain", "--policy", str(policy), str(request),
                                        "--account", "alice", "--json"])
    assert printed.exit_code == 0, printed.output
    assert served["denied_by"] == "free"
    assert _stable(json.loads(printed.stdout)) == _stable(served)
