"""Private Redis Cluster and Sentinel deployments on free loopback ports, for tests.

Each starts its own ``redis-server`` processes in a temporary folder, keeps nothing on
disk, and stops them afterwards. Where redis-server is missing the tests are skipped,
except under CI=true, where they fail: the product claims Cluster and Sentinel support.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.procs import free_port


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10,000) is free too and below 65,536."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 55000)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _need_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}, and CI must test Redis Cluster and Sentinel")
        pytest.skip(message)
    return binary


def _wait(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout}s")


@contextlib.contextmanager
def _servers(commands: list[list[str]], folder: Path) -> Iterator[None]:
    procs = [subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for cmd in commands]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _base(binary: str, port: int) -> list[str]:
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no"]


@contextlib.contextmanager
def redis_cluster(folder: Path, nodes: int = 3) -> Iterator[str]:
    """A cluster of ``nodes`` masters; yields ``redis+cluster://h:p,h:p,...``."""
    binary = _need_redis_server()
    ports: list[int] = []
    while len(ports) < nodes:
        if (port := _cluster_port()) not in ports:
            ports.append(port)
    commands = [[*_base(binary, p), "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{p}.conf"] for p in ports]
    with _servers(commands, folder):
        for p in ports:
            _wait(lambda p=p: redis.Redis(port=p).ping(), f"node {p}")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        _wait(lambda: all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok"
                          for p in ports), "cluster")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


@contextlib.contextmanager
def redis_sentinel(folder: Path, service: str = "gpmaster") -> Iterator[str]:
    """One master watched by one sentinel; yields ``redis+sentinel://h:p/service``."""
    binary = _need_redis_server()
    master, sentinel = free_port(), free_port()
    config = folder / "sentinel.conf"
    config.write_text(f"port {sentinel}\nbind 127.0.0.1\n"
                      f"sentinel monitor {service} 127.0.0.1 {master} 1\n")
    with _servers([_base(binary, master), [binary, str(config), "--sentinel"]], folder):
        _wait(lambda: redis.Redis(port=master).ping(), "master")
        _wait(lambda: redis.Redis(port=sentinel).sentinel_get_master_addr_by_name(service),
              "sentinel")
        yield f"redis+sentinel://127.0.0.1:{sentinel}/{service}"
