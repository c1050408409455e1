"""Real processes for integration tests: the proxy CLI and the fake model, on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Any,
                  timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"process exited early ({proc.returncode}): "
                               f"{log.read().decode(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become healthy in {timeout}s")


@contextlib.contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    # output to a file, not a pipe nobody reads: a chatty process must never stall
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "guardproxy", *args],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def fake_model(chunk_delay: float = 0.0) -> Iterator[str]:
    port = free_port()
    with process(["fake-model", "--port", str(port), "--chunk-delay", str(chunk_delay)],
                 port) as url:
        yield url


@contextlib.contextmanager
def proxy(policy: Path, upstream: str | None = None,
          extra: tuple[str, ...] = ()) -> Iterator[str]:
    port = free_port()
    args = ["serve", "--policy", str(policy), "--port", str(port), "--log-level", "warning"]
    if upstream:
        args += ["--upstream", upstream]
    with process([*args, *extra], port) as url:
        yield url
