"""``guardproxy explain``: counters read from a shared store, text and JSON output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from guardproxy import GuardMiddleware
from guardproxy.cli import main
from tests.conftest import write_policy
from tests.test_explain import BODY, CHAT, chat, client, model_app

RULES = """
rules:
  - name: free
    when: {tier: free}
    quota: 2/minute
  - name: tokens
    budget: 1000/day
"""


def test_explain_reads_the_counters_real_requests_left_in_redis(
        tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    policy = write_policy(tmp_path, RULES, state=url, key_prefix=prefix)

    async def spend() -> list[int]:
        app = GuardMiddleware(model_app, policy)
        try:
            async with client(app) as c:
                return [(await c.post(CHAT, **chat("key-alice"))).status_code
                        for _ in range(2)]
        finally:
            await app.state.aclose()

    assert asyncio.run(spend()) == [200, 200]
    request = tmp_path / "request.json"
    request.write_text(json.dumps(BODY))
    result = CliRunner().invoke(main, ["explain", "--policy", str(policy), str(request),
                                       "--account", "alice", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    free, tokens = report["rules"]
    assert (free["name"], free["decision"], free["status"]) == ("free", "deny", 429)
    assert tokens["windows"][0]["used"] == 2 * (10 + 5)   # model_app: prompt 10, output 5
    assert report["denied_by"] == "free" and report["forwarded_body"]["max_tokens"] == 5
    # read again: explaining counted nothing
    again = CliRunner().invoke(main, ["explain", "--policy", str(policy), str(request),
                                      "--key", "key-alice", "--json"])
    assert json.loads(again.stdout)["rules"][1]["windows"][0]["used"] == 30
    bob = CliRunner().invoke(main, ["explain", "--policy", str(policy), str(request),
                                    "--account", "bob"])
    assert bob.exit_code == 0
    assert "ALLOWED" in bob.stdout and "[  -  ] free (quota, enforce)" in bob.stdout


def test_text_output_stdin_and_errors(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, RULES)
    runner = CliRunner()
    envelope = json.dumps({"path": CHAT, "headers": {"authorization": "Bearer key-carol"},
                           "body": BODY})
    result = runner.invoke(main, ["explain", "--policy", str(policy), "-"], input=envelope)
    assert result.exit_code == 0, result.output
    assert "account carol (org other, tier free)" in result.stdout
    assert "[allow] free (quota, enforce)" in result.stdout
    assert 'forwarded body: {"model": "m", "max_tokens": 5' in result.stdout
    assert "memory://" in result.stderr   # its counters live in the proxy process
    request = tmp_path / "r.json"
    request.write_text(json.dumps(BODY))
    base = ["explain", "--policy", str(policy), str(request)]
    assert runner.invoke(main, [*base, "--account", "a", "--key", "k"]).exit_code == 2
    unknown = runner.invoke(main, [*base, "--account", "zed"])
    assert unknown.exit_code == 1 and "unknown account 'zed'" in unknown.stderr
    request.write_text("{nope")
    assert runner.invoke(main, base).exit_code == 2
