"""Hot reload and the admin listener in real ``guardproxy serve`` processes: SIGHUP with
one worker, every worker reloading with two, and ``admin.listen``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from guardproxy.cli import main
from guardproxy.fake_model import create_fake_app
from guardproxy.policy.load import load_policy
from guardproxy.reload import policy_version
from tests.conftest import write_policy
from tests.procs import _wait_healthy, free_port
from tests.servers import running_server
from tests.test_reload import TOKEN, ask, replace_file, rules, wait_until

RULES_A, RULES_B = rules(100_000, 10_000_000, 1), rules(200_000, 20_000_000, 2)


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


@contextlib.contextmanager
def serve(policy: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``guardproxy serve`` on a free port: (its URL, the process), output into ``log``."""
    port = free_port()
    with log.open("w+b") as out:
        proc = subprocess.Popen([sys.executable, "-m", "guardproxy", "serve", "--policy",
                                 str(policy), "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, out)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def policy_info(url: str) -> dict[str, Any]:
    answer = httpx.get(url + "/admin/policy", headers={"authorization": f"Bearer {TOKEN}"},
                       timeout=10)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def limit(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as client:
        return ask(client, "key-bob").headers["x-ratelimit-limit-requests"]


def test_sighup_reloads_one_worker(tmp_path: Path, fake: str) -> None:
    policy = write_policy(tmp_path, RULES_A, upstream=fake)
    good = policy.read_text()
    log = tmp_path / "serve.log"
    with serve(policy, log, "--watch-interval", "0") as (url, proc):
        first = policy_info(url)["version"]
        replace_file(policy, good.replace(RULES_A, RULES_B))
        assert limit(url) == "100000"     # no watcher: nothing until told
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: policy_info(url)["version"] != first, "the SIGHUP reload")
        assert limit(url) == "200000"
        replace_file(policy, good + "rules: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: policy_info(url)["reloads"]["failed"] == 1, "the failed reload")
        assert limit(url) == "200000" and proc.poll() is None
    lines = log.read_text().splitlines()
    assert sum(f"{policy}:" in line and "invalid YAML" in line for line in lines) == 1


def _pids(url: str, version: str, want: Callable[[set[int]], bool]) -> set[int]:
    """Ask until the workers answering, all serving ``version``, satisfy ``want``."""
    pids: set[int] = set()

    def enough() -> bool:
        info = policy_info(url)   # a new connection each time: any worker may answer
        if info["version"] == version:
            pids.add(info["pid"])
        else:
            pids.clear()          # one still serves another version: start again
        return want(pids)

    wait_until(enough, f"workers serving {version}", timeout=60)
    return pids


def version_of(policy: Path) -> str:
    return policy_version(load_policy(policy)).version


def test_every_worker_reloads(tmp_path: Path, fake: str,
                              redis_prefix: tuple[str, str]) -> None:
    """Two workers: a file change reaches both (each watches the files); SIGHUP makes
    uvicorn replace them, and a broken file keeps the old ones serving."""
    redis_url, prefix = redis_prefix
    policy = write_policy(tmp_path, RULES_A, upstream=fake, state=redis_url,
                          key_prefix=prefix)
    good = policy.read_text()
    log = tmp_path / "serve.log"
    with serve(policy, log, "--workers", "2", "--watch-interval", "0.2") as (url, proc):
        workers = _pids(url, version_of(policy), lambda p: len(p) == 2)
        replace_file(policy, good.replace(RULES_A, RULES_B))
        version_b = version_of(policy)
        assert _pids(url, version_b, lambda p: len(p) == 2) == workers  # reloaded in place
        # SIGHUP on a broken file: the new worker cannot start, the old ones stay
        replace_file(policy, good + "rules: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: b"aborting the restart" in log.read_bytes(), "the aborted restart",
                   timeout=60)
        assert _pids(url, version_b, lambda p: len(p) == 2) == workers
        # SIGHUP on a good file: every worker replaced by one serving it
        replace_file(policy, good.replace(RULES_A, rules(300_000, 30_000_000, 3)))
        proc.send_signal(signal.SIGHUP)
        _pids(url, version_of(policy), lambda p: len(p - workers) == 2)
        wait_until(lambda: all(f"Finished server process [{pid}]" in log.read_text()
                               for pid in workers), "the old workers' end", timeout=60)
        assert not {policy_info(url)["pid"] for _ in range(10)} & workers
        assert limit(url) == "300000"
    text = log.read_text()
    assert "Traceback" not in text
    assert f"{policy}:" in text and "invalid YAML" in text


def test_admin_listener_serves_admin_and_metrics_only(tmp_path: Path, fake: str) -> None:
    admin_port = free_port()
    policy = write_policy(tmp_path, "unguarded: [/ws]\n" + RULES_A.replace(
        f"{{token: {TOKEN}}}", f"{{token: {TOKEN}, listen: '127.0.0.1:{admin_port}'}}"),
        upstream=fake)
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve(policy, tmp_path / "serve.log") as (url, _):
        on_proxy = [httpx.get(url + path, headers=auth) for path in
                    ("/admin/policy", "/admin/usage/bob", "/metrics")]
        assert limit(url) == "100000"     # the proxy still proxies
        assert httpx.get(url + "/readyz").status_code == 200
        on_admin = httpx.get(admin + "/admin/policy", headers=auth)
        no_token = httpx.get(admin + "/admin/policy")
        metrics = httpx.get(admin + "/metrics")
        health = [httpx.get(admin + p).status_code for p in ("/healthz", "/readyz")]
        not_proxied = httpx.post(admin + "/v1/chat/completions", headers={
            "authorization": "Bearer key-bob"}, json={"model": "m", "messages": []})
        reload = httpx.post(admin + "/admin/reload", headers=auth)
        # an unguarded WebSocket goes upstream from the proxy port (which refuses it:
        # 501), never from the admin address (403 at the handshake)
        sockets = [_websocket_status(base.replace("http", "ws") + "/ws")
                   for base in (url, admin)]
    assert [r.status_code for r in on_proxy] == [404, 404, 404]
    assert (on_admin.status_code, no_token.status_code) == (200, 401)
    assert metrics.status_code == 200 and "guardproxy_requests_total" in metrics.text
    assert health == [200, 200]
    assert not_proxied.status_code == 404
    assert reload.status_code == 200 and reload.json()["reloaded"] is True
    assert sockets == [501, 403]


def _websocket_status(url: str) -> int:
    with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=10):
        pass
    return int(refused.value.response.status_code)


def test_admin_listener_needs_one_worker(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "admin: {token: t, listen: 127.0.0.1:9999}\n",
                          state="redis://127.0.0.1:1/0")
    result = CliRunner().invoke(main, ["serve", "--policy", str(policy), "--workers", "2"])
    assert result.exit_code == 2
    assert "admin.listen needs --workers 1" in result.output
    assert os.environ.get("GUARDPROXY_ADMIN_ADDRESS") is None
