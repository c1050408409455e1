"""GET /admin/usage/{account} and `guardproxy usage`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from click.testing import CliRunner

from guardproxy.app import create_app
from guardproxy.cli import main
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.servers import running_server

RULES = """
admin: {token: s3cret}
rules:
  - name: tokens
    budget: 1000/day; 5000/month
  - name: per-model
    budget: 1000/day
    per: model
"""


def test_admin_usage_endpoint(tmp_path: Path) -> None:
    with running_server(create_fake_app()) as fake:
        app = create_app(write_policy(tmp_path, RULES, upstream=fake))
        with running_server(app) as url:
            r = httpx.post(url + "/v1/chat/completions", timeout=10,
                           json={"model": "m", "max_tokens": 5,
                                 "messages": [{"role": "user", "content": "a b"}]},
                           headers={"authorization": "Bearer key-alice"})
            assert r.status_code == 200
            denied = httpx.get(url + "/admin/usage/alice")
            wrong = httpx.get(url + "/admin/usage/alice",
                              headers={"authorization": "Bearer key-alice"})
            ok = httpx.get(url + "/admin/usage/alice", headers={"authorization": "Bearer s3cret"})
            missing = httpx.get(url + "/admin/usage/nobody",
                                headers={"authorization": "Bearer s3cret"})
    assert (denied.status_code, wrong.status_code, missing.status_code) == (401, 401, 404)
    report = ok.json()
    tokens, per_model = report["budgets"]
    assert [w["used"] for w in tokens["windows"]] == [2 + 3 + 5] * 2
    assert [w["remaining"] for w in tokens["windows"]] == [990, 4990]
    assert tokens["windows"][0]["reserved"] == 0
    assert "note" in per_model


def test_usage_cli_reads_redis(tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    redis_url, prefix = redis_prefix
    with running_server(create_fake_app()) as fake:
        policy = write_policy(tmp_path, RULES, upstream=fake, state=redis_url, key_prefix=prefix)
        with running_server(create_app(policy)) as url:
            httpx.post(url + "/v1/chat/completions", timeout=10,
                       json={"model": "m", "max_tokens": 4, "messages": []},
                       headers={"authorization": "Bearer key-alice"})
    result = CliRunner().invoke(main, ["usage", "alice", "--policy", str(policy), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["budgets"][0]["windows"][0]["used"] == 4
    table = CliRunner().invoke(main, ["usage", "alice", "--policy", str(policy)])
    assert "used" in table.stdout and "tokens" in table.stdout
    unknown = CliRunner().invoke(main, ["usage", "zed", "--policy", str(policy)])
    assert unknown.exit_code == 1
