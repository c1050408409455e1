"""Child processes of the bench: start, wait until ready, stop, and measure CPU and RSS."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import payloads

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((payloads.LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pinning:
    """CPU placement: the system under test alone on ``sut``; the bench itself (TTFB client,
    samplers), the fake upstream, the load generator and redis share ``aux``."""

    enabled: bool
    sut: int = 0
    aux: int = 1

    def prefix(self, role: str) -> list[str]:
        if not self.enabled:
            return []
        return ["taskset", "-c", str(self.sut if role == "sut" else self.aux)]

    def pin_self(self) -> None:
        if self.enabled:
            os.sched_setaffinity(0, {self.aux})

    def describe(self) -> str:
        if not self.enabled:
            return "no CPU pinning"
        return (f"taskset: system under test (proxy) on CPU {self.sut}; fake upstream, "
                f"load generator, redis and the bench itself (TTFB client) on CPU {self.aux}")


def detect_pinning(requested: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if not requested or len(cpus) < 2 or shutil.which("taskset") is None:
        return Pinning(False)
    return Pinning(True, sut=cpus[0], aux=cpus[1])


class Child:
    """A child process whose output goes to a log file; stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def probe(port: int, stream: bool = False, timeout: float = 5.0) -> int:
    """One chat request to 127.0.0.1:port; returns the HTTP status (body fully read)."""
    conn = http.client.HTTPConnection(payloads.LOOPBACK, port, timeout=timeout)
    try:
        conn.request("POST", payloads.PATH, body=payloads.request_body(stream),
                     headers=payloads.request_headers())
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_ready(child: Child, port: int, timeout: float = 30.0) -> int:
    """Poll with a real chat request until the server answers anything below 500."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n"
                               f"{child.log_tail()}")
        try:
            status = probe(port, timeout=2.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status < 500:
                return status
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready in {timeout}s ({last}):\n{child.log_tail()}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn with workers > 1 forks; one worker does not)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of pid and its descendants, in bytes."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class Meter:
    """CPU-time deltas of some pids over a window, and the max RSS sampled every 50 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.max_rss = dict.fromkeys(pids, 0)
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.cpu: dict[str, float] = {}
        self.wall = 0.0

    def _sample(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.max_rss[name] = max(self.max_rss[name], rss_bytes(pid))
            if self._stop.wait(0.05):
                return

    def __enter__(self) -> Meter:
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = {name: cpu_seconds(pid) - self._cpu0[name] for name, pid in self.pids.items()}
        self._stop.set()
        self._thread.join(timeout=5)
        for name, pid in self.pids.items():
            self.max_rss[name] = max(self.max_rss[name], rss_bytes(pid))


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((payloads.LOOPBACK, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(pinning: Pinning, log_dir: Path) -> tuple[Child | None, str | None, str]:
    """A private, throw-away redis-server (no persistence) on a free loopback port; else the
    one already on 127.0.0.1:6379 (db 15). Returns (child, url, note)."""
    binary = shutil.which("redis-server")
    if binary:
        port = free_port()
        child = Child("redis", [*pinning.prefix("aux"), binary, "--bind", payloads.LOOPBACK,
                                "--port", str(port), "--save", "", "--appendonly", "no",
                                "--protected-mode", "yes"], log_dir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and child.alive():
            if redis_ping(port):
                return child, f"redis://{payloads.LOOPBACK}:{port}/15", \
                    f"private redis-server on port {port} (db 15, no persistence)"
            time.sleep(0.05)
        child.stop()
    if redis_ping(6379):
        return None, f"redis://{payloads.LOOPBACK}:6379/15", "existing redis on 6379 (db 15)"
    return None, None, "no redis available"
