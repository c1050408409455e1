"""A whole proxy run (uvicorn, the fake model, linkage, an admin token) writes an audit
trail that holds no secret, verifies, and replays through ``guardproxy ingest``:
today's audit log is tomorrow's linkage history."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from click.testing import CliRunner

from guardproxy.app import create_app
from guardproxy.cli import main
from guardproxy.fake_model import create_fake_app
from tests.conftest import sha, write_policy
from tests.servers import running_server
from tests.test_audit import (  # noqa: F401 - no_secret_in_any_line: autouse
    ADMIN_TOKEN,
    LINKAGE_SECRET,
    RAW_VALUES,
    SECRET_PROMPT,
    no_secret_in_any_line,
    scan,
)

CARD, EMAIL, DEVICE = RAW_VALUES
TOP = f"""
admin: {{token: {ADMIN_TOKEN}}}
audit: {{path: {{audit}}, chain: true, max_bytes: 4KB, backups: 20}}
linkage:
  secret: {LINKAGE_SECRET}
  window: 30d
  threshold: 1.0
  signals:
    - {{attribute: payment, weight: 1.0}}
    - {{attribute: email, weight: 1.0}}
    - {{ip: exact, weight: 0.5, max_fanout: 20}}
    - {{header: x-device-id, weight: 0.6}}
rules:
  - name: free-requests
    when: {{tier: free}}
    quota: 2/minute
  - name: tokens
    budget: 100000/day
    per: account
"""
# alice and bob pay with one card: one actor whatever the log says
ATTRIBUTES = {"alice": {"payment": CARD}, "bob": {"payment": CARD},
              "carol": {"payment": "card-other", "email": EMAIL}}


def proxy_policy(tmp: Path, upstream: str) -> tuple[Path, Path]:
    audit = tmp / "audit.jsonl"
    policy = write_policy(tmp, TOP.replace("{audit}", str(audit)), upstream=upstream)
    accounts = tmp / "accounts.yaml"
    lines = accounts.read_text().splitlines()
    out = []
    for text in lines:   # each account gets its attributes after its id line
        out.append(text)
        if text.startswith("  - id: "):
            out.append("    attributes: " + json.dumps(ATTRIBUTES[text.split(": ")[1]]))
    accounts.write_text("\n".join(out) + "\n")
    return policy, audit


def test_a_proxy_run_audits_verifies_and_replays(tmp_path: Path) -> None:
    with running_server(create_fake_app()) as fake:
        policy, _ = proxy_policy(tmp_path, fake)
        with running_server(create_app(policy)) as url, \
                httpx.Client(base_url=url, timeout=10) as c:
            def chat(key: str | None, n: int, **extra: object) -> int:
                headers = {"x-device-id": DEVICE}
                if key:
                    headers["authorization"] = f"Bearer {key}"
                body = {"model": "m", "max_tokens": 20, **extra,
                        "messages": [{"role": "user", "content": f"{SECRET_PROMPT} {n}"}]}
                return c.post("/v1/chat/completions", json=body, headers=headers).status_code

            statuses = [chat("key-alice", i) for i in range(3)]
            statuses += [chat("key-bob", 3), chat("key-bob", 4, stream=True),
                         chat("key-carol", 5), chat("key-wrong", 6), chat(None, 7)]
            c.get("/admin/policy", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert statuses == [200, 200, 429, 200, 200, 200, 401, 401]

    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) >= 2, "4KB: the run rotated"
    assert scan(tmp_path) == len(statuses), "one line per guarded request, none else"
    for file in files:
        assert sha("key-alice") not in file.read_text() and "x-device-id" not in file.read_text()

    verified = CliRunner().invoke(main, ["audit", "verify", *map(str, files)])
    assert verified.exit_code == 0 and verified.stdout.startswith(
        f"OK: {len(statuses)} lines in {len(files)} files; the chain starts at the trail's "
        "first line"), verified.output

    export = tmp_path / "graph.json"
    replayed = CliRunner().invoke(main, ["ingest", "--policy", str(policy),
                                         *map(str, files), "--export", str(export)])
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stderr == "", "every audit line is an ingest line"
    assert (f"{len(statuses)} lines read, 0 skipped, 6 records "
            "(2 audit lines without an account skipped); 3 accounts") in replayed.stdout
    assert "older than one before it" not in replayed.stdout, "rotations read oldest first"
    clusters = json.loads(export.read_text())["clusters"]
    assert [sorted(c["accounts"]) for c in clusters] == [["alice", "bob"]]
