"""Attacks on the operations features (issue 11): the audit trail, its chain check, hot
reload and the serve command's file watch. Each test is one confirmed finding."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
from click.testing import CliRunner

from guardproxy import GuardMiddleware
from guardproxy.audit.line import GENESIS, encode, line_hash
from guardproxy.audit.trail import audit_trails
from guardproxy.cli import main as cli
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy
from guardproxy.reload import Reloader
from tests.conftest import write_policy
from tests.procs import proxy
from tests.test_middleware_edges import StreamingUpstream
from tests.test_request_plan import call

TOKEN = "ops-attack-token-7d1e"


def rule(name: str) -> str:
    return f"admin: {{token: {TOKEN}}}\nrules:\n  - name: {name}\n    quota: 5/minute\n"


def replace_file(path: Path, text: str) -> None:
    aside = path.with_name(path.name + ".tmp")
    aside.write_text(text)
    os.replace(aside, path)


# Attack: one client with a valid key (even one rate-limited to 429) sends model names of
# megabytes; each becomes an audit line that size, so a few requests rotate the whole
# retained trail (max_bytes x backups) away: the investigator's evidence is destroyed.
async def test_client_model_names_cannot_rotate_the_trail_history_away(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path, f"""
audit: {{path: {audit}, max_bytes: 1MB, backups: 2, chain: true}}
rules:
  - name: free-requests
    quota: 1/minute
    per: account
""")
    app = GuardMiddleware(StreamingUpstream(), policy)
    headers = {"content-type": "application/json", "authorization": "Bearer key-alice"}
    evidence = await call(app, "POST", "/v1/chat/completions",
                          headers={**headers, "x-request-id": "evidence-1"},
                          body=json.dumps({"model": "m", "messages": []}).encode())
    assert evidence.status == 200
    for i in range(3):   # denied (429) requests: the body is still read for the line
        body = json.dumps({"model": "M" * (1 << 20), "messages": []}).encode()
        await call(app, "POST", "/v1/chat/completions",
                   headers={**headers, "x-request-id": f"flood-{i}"}, body=body)
    await audit_trails(app.state).aclose()
    kept = await asyncio.to_thread(
        lambda: b"".join(f.read_bytes() for f in tmp_path.glob("audit.jsonl*")))
    assert b'"evidence-1"' in kept, "3 requests of one client rotated the trail away"


# Attack: with --workers N each worker writes its own chained trail (audit-{pid}.jsonl,
# as the README asks); verifying them together (audit-*.jsonl*) reports a break at the
# start of every trail but the first, so a clean trail reads FAILED (real tampering then
# hides among false alarms).
def test_verify_checks_per_worker_trails_each_on_its_own(tmp_path: Path) -> None:
    for pid in (101, 202):
        prev, lines = GENESIS, []
        for n in range(3):
            line = encode({"time": float(n), "request_id": f"{pid}-{n}", "account": "a",
                           "status": 200, "decisions": [],
                           "tokens": {"reserved": 0, "settled": 0}}, prev)
            lines.append(line)
            prev = line_hash(line)
        (tmp_path / f"audit-{pid}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = CliRunner().invoke(cli, ["audit", "verify", str(tmp_path / "audit-101.jsonl"),
                                      str(tmp_path / "audit-202.jsonl")])
    assert result.exit_code == 0, result.output


# Attack: the policy file is replaced (mv) while a reload is parsing it. The reload serves
# the content it parsed but records the version (and the watcher's "already tried") of
# the newer file, so the watcher never loads the newer file: this worker serves a stale
# policy indefinitely while /readyz, /admin/policy and guardproxy_policy_info claim the
# new version (workers diverge and the version alert cannot see it).
async def test_a_file_replaced_during_a_reload_is_loaded_by_the_next_poll(
        tmp_path: Path) -> None:
    policy_path = write_policy(tmp_path, rule("one"))

    served: list[Policy] = []
    swapped = False

    def prepare(policy: Policy) -> Policy:
        nonlocal swapped
        if not swapped:   # the operator's mv lands while this reload parses
            swapped = True
            replace_file(policy_path, policy_path.read_text().replace("name: two",
                                                                       "name: three"))
        return policy

    reloader = Reloader(load_policy(policy_path), served.append, prepare=prepare,
                        interval=None)
    replace_file(policy_path, policy_path.read_text().replace("name: one", "name: two"))
    assert (await reloader.reload()).ok
    await reloader._poll(0.001)   # the watcher's next look at the files
    assert served[-1].rules[0].name == "three", (
        f"serving {served[-1].rules[0].name!r} as version {reloader.version}: the file "
        "on disk (that version) is never loaded")


# Attack (or plain ops): a Kubernetes ConfigMap update swaps the ..data symlink and
# deletes the old timestamped folder. `guardproxy serve` resolves the policy path's
# symlinks at start, so it watches and reloads the deleted folder's file: every later
# reload fails and the new policy is never served (README: "a ConfigMap update is seen").
def test_serve_reloads_a_configmap_symlink_swap(tmp_path: Path) -> None:
    mount = tmp_path / "etc"
    mount.mkdir()
    first = mount / "..2024_01"
    first.mkdir()
    write_policy(first, rule("one"))
    (mount / "..data").symlink_to(first.name)
    for name in ("policy.yaml", "accounts.yaml"):
        (mount / name).symlink_to(f"..data/{name}")
    with proxy(mount / "policy.yaml", upstream="http://127.0.0.1:9",
               extra=("--watch-interval", "0")) as url:
        second = mount / "..2024_02"
        second.mkdir()
        write_policy(second, rule("two"))
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")   # as the kubelet does
        for f in first.iterdir():
            f.unlink()
        first.rmdir()
        auth = {"authorization": f"Bearer {TOKEN}"}
        reply = httpx.post(url + "/admin/reload", headers=auth, timeout=20)
        assert reply.status_code == 200, reply.text
        policy = httpx.get(url + "/admin/policy", headers=auth, timeout=20).json()
        assert policy["rules"] == ["two"]
