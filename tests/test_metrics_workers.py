"""Metrics with two uvicorn worker processes (multiprocess mode): whichever worker
answers /metrics, it reports both workers' requests.

The workers run ``worker_app`` below (``uvicorn --factory``): the guarded app with
``metrics_app`` mounted at /metrics, as the standalone proxy mounts it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from guardproxy import GuardMiddleware
from guardproxy.metrics import (
    MULTIPROC_ENV,
    metrics_app,
    metrics_for,
    prepare_multiprocess_dir,
    worker_exited,
)
from guardproxy.policy.load import load_policy
from tests.conftest import write_policy
from tests.procs import free_port
from tests.test_metrics import samples, value

POLICY_ENV = "GUARDPROXY_METRICS_TEST_POLICY"
ROOT = Path(__file__).resolve().parent.parent
RULES = """
rules:
  - name: requests
    quota: 100000/minute
"""


async def pid_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The upstream: answers with the worker's pid, so the test sees who served."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"pid": os.getpid(),
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def worker_app() -> ASGIApp:
    guarded = GuardMiddleware(pid_app, load_policy(os.environ[POLICY_ENV]))
    observer = metrics_for(guarded.state)
    observer.metrics.loaded("test-v1")
    served = metrics_app(observer)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await served(scope, receive, send)
        else:
            await guarded(scope, receive, send)

    return app


@contextlib.contextmanager
def two_workers(policy: Path, folder: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, POLICY_ENV: str(policy), MULTIPROC_ENV: str(folder),
           "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.test_metrics_workers:worker_app",
             "--factory", "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"uvicorn did not start: {log.read().decode()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/metrics", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_metrics_sum_both_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = write_policy(tmp_path, RULES)
    folder = prepare_multiprocess_dir(tmp_path / "prom")
    (folder / "counter_999999.db").write_bytes(b"stale")   # a previous run's file
    folder = prepare_multiprocess_dir(folder)
    assert not list(folder.glob("*.db"))
    with two_workers(policy, folder) as url:
        pids: list[int] = []
        # a new connection each time, until both workers have served (bounded)
        while len(set(pids)) < 2 or len(pids) < 20:
            assert len(pids) < 2000, f"one worker served everything: {set(pids)}"
            reply = httpx.post(url + "/v1/chat/completions", timeout=10,
                               headers={"authorization": "Bearer key-alice"},
                               json={"model": "m", "max_tokens": 5,
                                     "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200, reply.text
            pids.append(reply.json()["pid"])
        for _ in range(6):   # every scrape, from either worker, sees the sum
            got = samples(httpx.get(url + "/metrics", timeout=10).text)
            assert value(got, "guardproxy_requests_total", status="200", dialect="openai",
                         route="chat", ending="completed") == len(pids)
            assert value(got, "guardproxy_decisions_total", rule="requests",
                         mode="enforce", outcome="allowed") == len(pids)
            assert value(got, "guardproxy_upstream_seconds_count", dialect="openai",
                         route="chat") == len(pids)
            # livesum: both live workers serve the version
            assert value(got, "guardproxy_policy_info", version="test-v1") == 2
    def pids_of(pattern: str) -> set[int]:
        return {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob(pattern)}

    assert pids_of("counter_*.db") == pids_of("gauge_livesum_*.db") == set(pids)
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    for pid in set(pids):   # the workers are gone: their live gauges go, counters stay
        worker_exited(pid)
    assert pids_of("gauge_live*.db") == set()
    assert pids_of("counter_*.db") == set(pids)
