"""/healthz and /readyz: alive, and ready (policy loaded, state store reachable or its
failure policy allows serving), against a private Redis that the test kills."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from guardproxy.app import create_app
from tests.conftest import write_policy
from tests.procs import free_port
from tests.servers import running_server

RULES = """admin: {token: t0ken}
rules:
  - name: requests
    quota: 100/day
    on_store_error: %(quota)s
  - name: tokens
    budget: 10000/day
    on_store_error: allow
"""


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free loopback port (the test may kill it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield url, proc
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_memory_state_is_ready(tmp_path: Path) -> None:
    app = create_app(write_policy(tmp_path, RULES % {"quota": "deny"}), watch=None)
    with running_server(app) as url:
        alive, ready = httpx.get(url + "/healthz"), httpx.get(url + "/readyz")
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "version": app.reloader.version,
                            "store": "memory"}


def test_readyz_follows_redis_and_the_failure_policy(tmp_path: Path) -> None:
    with private_redis() as (redis_url, server):
        policy = write_policy(tmp_path, RULES % {"quota": "deny"}, state=redis_url)
        app = create_app(policy, watch=None)
        with running_server(app) as url:
            up = httpx.get(url + "/readyz")
            server.kill()
            server.wait()
            down = httpx.get(url + "/readyz", timeout=10)
            alive = httpx.get(url + "/healthz")
            # every rule allows on a store error: the proxy serves without Redis
            policy.write_text(policy.read_text().replace("on_store_error: deny",
                                                         "on_store_error: allow"))
            reload = httpx.post(url + "/admin/reload", timeout=10,
                                headers={"authorization": "Bearer t0ken"})
            serving = httpx.get(url + "/readyz", timeout=10)
    assert (up.status_code, up.json()["store"]) == (200, "ok")
    assert down.status_code == 503
    assert down.json() == {"status": "unready", "version": up.json()["version"],
                           "store": "unreachable"}
    assert "127.0.0.1" not in down.text   # no store address on an open endpoint
    assert alive.status_code == 200
    assert reload.status_code == 200
    assert serving.status_code == 200
    assert (serving.json()["status"], serving.json()["store"]) == ("ready", "unreachable")
