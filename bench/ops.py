"""What the audit trail and the metrics add per request: ``python -m bench.ops``.

    python -m bench.ops                      # 20 rounds x 300 requests per cell (~70 s)
    python -m bench.ops --rounds 40 --block 500
    python -m bench.ops --quick              # 4 rounds x 100: a smoke run, no CI

The real server path: four ``guardproxy serve`` processes (uvicorn, one worker, the
``guardproxy-default-lifted`` policy of bench/policies.py: every rule of
policies/default.yaml, counts lifted so requests are allowed; ``memory://`` state; file
watching off) in front of bench/fake_upstream.py, all started at once and differing only in

    a  no audit, metrics off   b  metrics   c  audit to a file + metrics   d  as c, chain: true

Metrics cannot be switched off in guardproxy (``GuardMiddleware._observers`` always adds
``metrics_observer(policy, state)``): for (a) only, the bench starts the server through
``python -m bench.ops serve-child --no-metrics``, which replaces
``guardproxy.middleware.metrics_observer`` with a function returning None for the life of
that process. It is a bench-only switch, not a guardproxy setting. The audit files go to
/dev/shm (tmpfs) when it exists, else to the bench's temporary directory.

One client, one keep-alive connection per server and mode (concurrency 1; raw sockets and
httptools; a request's latency is from its first byte sent to the last byte of the
response read). Each round runs a block of requests on every (mode, config) cell, the
configs in a rotated order each round, the modes alternating, so slow drifts of a shared
VM's speed fall on all cells alike. Added p50: per round, the block's median minus (a)'s
median in the same round and mode; the table gives the median of those differences over
the rounds, its 95% confidence interval (sign test: order statistics of the rounds'
differences; needs >= 6 rounds) and the min and max. p50/p99: of all samples pooled.
Proxy CPU: the server's utime+stime over its blocks (10 ms ticks: about +-10 us/request).
On 2 cores the servers are pinned to CPU 0, the upstream and the client to CPU 1.
At the end it scrapes each server's ``/metrics`` (each family summed over its labels; sent:
every request of the run, warm-up and readiness probe included), stops the servers and
counts the audit lines (``guardproxy audit verify`` on the chained one).

One run (2-core VM shared with other jobs; p99 is noise), with the audit writer
gathering lines for 20 ms per write (``audit/writer.py`` LINGER; before it, one
thread wake-up per line cost +0.095 ms p50 for c and d)::

    a: no audit, metrics off; b: metrics; c: audit + metrics; d: audit chain + metrics;
    +: over a in the same round; CPU: the server's per request

    | mode | cfg | p50 ms | p99 ms | +p50 ms: median [95% CI] | +p50 min .. max | CPU us | +CPU us |
    |---|---|---|---|---|---|---|---|
    | plain | a | 0.869 | 1.375 | — | — | 922 | — |
    | plain | b | 0.896 | 1.542 | +0.021 [+0.017, +0.033] | -0.121 .. +0.289 | 953 | +32 |
    | plain | c | 0.889 | 1.730 | +0.017 [+0.013, +0.022] | -0.148 .. +0.129 | 970 | +48 |
    | plain | d | 0.898 | 1.759 | +0.027 [+0.019, +0.032] | -0.022 .. +0.061 | 970 | +48 |
    | stream | a | 1.063 | 1.659 | — | — | 1093 | — |
    | stream | b | 1.085 | 1.744 | +0.026 [+0.024, +0.038] | -0.162 .. +0.081 | 1117 | +23 |
    | stream | c | 1.081 | 1.831 | +0.020 [+0.004, +0.033] | -0.130 .. +0.210 | 1140 | +47 |
    | stream | d | 1.089 | 1.902 | +0.029 [+0.020, +0.037] | +0.007 .. +0.139 | 1152 | +58 |

    | cfg | sent | requests_total | decisions_total | audit_written_total | audit_dropped_total |
    |---|---|---|---|---|---|
    | a | 12201 | 0 | 0 | 0 | 0 |
    | b | 12201 | 12201 | 61005 | 0 | 0 |
    | c | 12201 | 12201 | 61005 | 12201 | 0 |
    | d | 12201 | 12201 | 61005 | 12201 | 0 |

    - audit c: 12201 lines in 1 file(s) after shutdown
    - audit d: 12201 lines in 1 file(s) after shutdown; verify OK: 12,201 lines in 1 file
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools

from bench import payloads, policies, procs
from bench.loadgen import percentile

REPO = Path(__file__).resolve().parent.parent
VARIANT = "guardproxy-default-lifted"
MODES = ("plain", "stream")


@dataclass(frozen=True)
class Setup:
    """One server configuration: metrics observer on or off, audit trail (and chain)."""

    label: str
    metrics: bool
    audit: bool
    chain: bool = False


SETUPS: dict[str, Setup] = {
    "a": Setup("no audit, metrics off", metrics=False, audit=False),
    "b": Setup("metrics", metrics=True, audit=False),
    "c": Setup("audit + metrics", metrics=True, audit=True),
    "d": Setup("audit chain + metrics", metrics=True, audit=True, chain=True),
}
BASE = "a"


# ---------------------------------------------------------------------------- the server
def _no_metrics(policy: object, state: object) -> None:
    """Stands in for ``metrics_observer`` in (a): no metrics observer at all."""
    return None


def serve_child(argv: list[str]) -> None:
    """``serve-child --policy P --port N [--no-metrics]``: ``guardproxy serve`` in this
    process (uvicorn imports the app here, one worker), optionally without metrics."""
    from unittest import mock

    import guardproxy.middleware
    from guardproxy.cli import main as guardproxy_main

    parser = argparse.ArgumentParser(prog="python -m bench.ops serve-child")
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    serve = [*policies.serve_args(args.policy, args.port), "--watch-interval", "0"]
    with contextlib.ExitStack() as stack:
        if args.no_metrics:  # bench-only: guardproxy has no setting for this
            stack.enter_context(mock.patch.object(guardproxy.middleware, "metrics_observer",
                                                  _no_metrics))
        guardproxy_main.main(serve, prog_name="guardproxy")


# ---------------------------------------------------------------------------- the client
class _Done:
    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


class Client:
    """One keep-alive connection to 127.0.0.1:port, one request at a time."""

    def __init__(self, port: int, stream: bool) -> None:
        body = payloads.request_body(stream)
        head = [f"POST {payloads.PATH} HTTP/1.1", f"Host: {payloads.LOOPBACK}",
                f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in payloads.request_headers().items())]
        self.request_bytes = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.port = port
        self.sent = 0
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((payloads.LOOPBACK, self.port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self) -> float:
        """Seconds from the first byte sent to the response read whole. Raises
        ``RuntimeError`` on a status other than 200 (the policy allows every request)."""
        done = _Done()
        parser = httptools.HttpResponseParser(done)
        start = time.perf_counter()
        self.sock.sendall(self.request_bytes)
        while not done.complete:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            parser.feed_data(data)
        spent = time.perf_counter() - start
        self.sent += 1
        if parser.get_status_code() != 200:
            raise RuntimeError(f"HTTP {parser.get_status_code()} from port {self.port}")
        if not parser.should_keep_alive():
            self.sock.close()
            self.sock = self._connect()
        return spent

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------- measuring
@dataclass
class Cell:
    """One (config, mode): each round's block of latencies (s) and the server CPU (s)."""

    blocks: list[list[float]] = field(default_factory=list)
    cpu_s: float = 0.0

    def all(self) -> list[float]:
        return sorted(x for block in self.blocks for x in block)

    def medians(self) -> list[float]:
        return [statistics.median(block) for block in self.blocks]


def measure(clients: dict[tuple[str, str], Client], pids: dict[str, int], rounds: int,
            block: int, warmup: int) -> dict[tuple[str, str], Cell]:
    names = list(SETUPS)
    for client in clients.values():  # first-use caches, connection setup
        for _ in range(warmup):
            client.request()
    cells = {key: Cell() for key in clients}
    for r in range(rounds):
        modes = MODES if r % 2 == 0 else MODES[::-1]
        order = names[r % len(names):] + names[:r % len(names)]
        for mode in modes:
            for name in order:
                client, cell = clients[(name, mode)], cells[(name, mode)]
                cpu0 = procs.cpu_seconds(pids[name])
                cell.blocks.append([client.request() for _ in range(block)])
                cell.cpu_s += procs.cpu_seconds(pids[name]) - cpu0
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return cells


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free CI of the median (sign test): ``[x_(k), x_(n-k+1)]`` with the
    largest k such that P(Binomial(n, 1/2) < k) <= (1 - level) / 2; None when n is too
    small (fewer than 6 values at 95%)."""
    xs, n = sorted(values), len(values)
    alpha, tail, k = (1 - level) / 2, 0.0, 0
    while k < n and tail + math.comb(n, k) / 2**n <= alpha:
        tail += math.comb(n, k) / 2**n
        k += 1
    return (xs[k - 1], xs[n - k]) if k > 0 else None


def table(cells: dict[tuple[str, str], Cell], block: int) -> str:
    rows = ["| mode | cfg | p50 ms | p99 ms | +p50 ms: median [95% CI] | +p50 min .. max "
            "| CPU us | +CPU us |",
            "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        base = cells[(BASE, mode)]
        base_cpu = base.cpu_s / max(1, len(base.blocks) * block) * 1e6
        for name in SETUPS:
            cell = cells[(name, mode)]
            everything = cell.all()
            cpu = cell.cpu_s / max(1, len(cell.blocks) * block) * 1e6
            p50, p99 = percentile(everything, 50) * 1e3, percentile(everything, 99) * 1e3
            if name == BASE:
                added, spread, added_cpu = "—", "—", "—"
            else:
                deltas = [(x - y) * 1e3 for x, y in zip(cell.medians(), base.medians(),
                                                          strict=True)]
                ci = median_ci(deltas)
                bounds = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
                added = f"{statistics.median(deltas):+.3f}{bounds}"
                spread = f"{min(deltas):+.3f} .. {max(deltas):+.3f}"
                added_cpu = f"{cpu - base_cpu:+.0f}"
            rows.append(f"| {mode} | {name} | {p50:.3f} | {p99:.3f} | {added} "
                        f"| {spread} | {cpu:.0f} | {added_cpu} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- afterwards
SCRAPED = ("guardproxy_requests_total", "guardproxy_decisions_total",
           "guardproxy_audit_written_total", "guardproxy_audit_dropped_total")


def scrape(port: int) -> dict[str, float]:
    """Each ``SCRAPED`` family's samples summed over their labels, from GET /metrics."""
    conn = http.client.HTTPConnection(payloads.LOOPBACK, port, timeout=10.0)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    sums = dict.fromkeys(SCRAPED, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def audit_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def count_lines(path: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in audit_files(path))


def verify(path: Path, env: dict[str, str]) -> str:
    """``guardproxy audit verify`` on the trail: its last output line."""
    done = subprocess.run([sys.executable, "-m", "guardproxy", "audit", "verify",
                           *map(str, audit_files(path))], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env={**os.environ, **env})
    lines = (done.stdout + done.stderr).strip().splitlines()
    return f"exit {done.returncode}: {lines[-1] if lines else ''}"


# ---------------------------------------------------------------------------- the run
def audit_dir(work: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="guardproxy-ops-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="audit-", dir=work))


def run(args: argparse.Namespace) -> int:
    pinning = procs.detect_pinning(not args.no_pin)
    pinning.pin_self()
    env = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    children: list[procs.Child] = []
    clients: dict[tuple[str, str], Client] = {}
    with tempfile.TemporaryDirectory(prefix="guardproxy-ops-") as tmp:
        work = Path(tmp)
        trails = audit_dir(work)
        try:
            up_port = procs.free_port()
            upstream = procs.Child("upstream", [*pinning.prefix("aux"), *procs.python_module(
                "bench.fake_upstream", "--port", str(up_port))], work, env)
            children.append(upstream)
            procs.wait_ready(upstream, up_port)
            ports, pids, paths = {}, {}, {}
            for name, setup in SETUPS.items():
                paths[name] = trails / f"{name}.jsonl" if setup.audit else None
                policy, _ = policies.write_policy(
                    work / name, VARIANT, f"http://{payloads.LOOPBACK}:{up_port}", None,
                    audit_path=paths[name], audit_chain=setup.chain)
                ports[name] = procs.free_port()
                argv = procs.python_module("bench.ops", "serve-child", "--policy", str(policy),
                                           "--port", str(ports[name]))
                child = procs.Child(name, [*pinning.prefix("sut"), *argv,
                                           *([] if setup.metrics else ["--no-metrics"])],
                                    work, env)
                children.append(child)
                pids[name] = child.pid
            for name, child in zip(SETUPS, children[1:], strict=True):
                status = procs.wait_ready(child, ports[name])
                if status != 200:
                    raise RuntimeError(f"{name}: readiness probe answered HTTP {status}")
            for name in SETUPS:
                for mode in MODES:
                    clients[(name, mode)] = Client(ports[name], mode == "stream")
            print(f"{pinning.describe()}; audit files in {trails}", file=sys.stderr)
            cells = measure(clients, pids, args.rounds, args.block, args.warmup)
            for child in children[1:]:
                if not child.alive():
                    raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
            print(f"\n{args.rounds} rounds x {args.block} requests per cell, concurrency 1, "
                  f"real servers (uvicorn), {VARIANT}, memory://; "
                  f"{pinning.describe()}\n")
            print(" ".join(f"{name}: {setup.label};" for name, setup in SETUPS.items()))
            print(f"+: over {BASE} in the same round; CPU: the server's per request\n")
            print(table(cells, args.block))
            print("\n| cfg | sent | requests_total | decisions_total | audit_written_total "
                  "| audit_dropped_total |\n|---|---|---|---|---|---|")
            for name in SETUPS:
                sent = 1 + sum(clients[(name, m)].sent for m in MODES)  # +1: readiness probe
                m = scrape(ports[name])
                print(f"| {name} | {sent} | {m['guardproxy_requests_total']:.0f} "
                      f"| {m['guardproxy_decisions_total']:.0f} "
                      f"| {m['guardproxy_audit_written_total']:.0f} "
                      f"| {m['guardproxy_audit_dropped_total']:.0f} |")
            for client in clients.values():
                client.close()
            for child in children[1:]:
                child.stop()  # SIGTERM: lifespan shutdown flushes the audit writer
            print()
            for name, path in paths.items():
                if path is not None:
                    check = f"; verify: {verify(path, env)}" if SETUPS[name].chain else ""
                    print(f"- audit {name}: {count_lines(path)} lines in "
                          f"{len(audit_files(path))} file(s) after shutdown{check}")
        finally:
            for client in clients.values():
                client.close()
            for child in reversed(children):
                child.stop()
            shutil.rmtree(trails, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-child"]:
        serve_child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.ops",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (20)")
    parser.add_argument("--block", type=int, default=None,
                        help="requests per cell and round (300)")
    parser.add_argument("--warmup", type=int, default=100, help="requests per cell first")
    parser.add_argument("--quick", action="store_true", help="4 rounds x 100 requests")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 20)
    args.block = args.block or (100 if args.quick else 300)
    if not (1 <= args.rounds <= 1000 and 1 <= args.block <= 100_000
            and 0 <= args.warmup <= 100_000):
        parser.error("--rounds 1..1000, --block 1..100000, --warmup 0..100000")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
