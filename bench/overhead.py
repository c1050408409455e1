"""Overhead benchmark: what a proxy adds on top of a fast fake upstream, all on 127.0.0.1.

    python -m bench.overhead                                  # every target, 5 s cells
    python -m bench.overhead --targets direct,baseline --quick
    python -m bench.overhead --targets direct,guardproxy-norules --concurrency 1,32,64

Targets: ``direct`` (no proxy), ``baseline`` (bare Starlette + httpx on aiohttp's transport,
bench/baseline_proxy.py), ``baseline-httpcore`` (the same on httpx's default httpcore pool)
and the guardproxy variants of bench/policies.py (the policy texts live there). Cells:
plain/stream x each concurrency. Prints a Markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import loadgen, payloads, policies, procs, report, ttfb

REPO = Path(__file__).resolve().parent.parent
BASELINES = {"baseline": "aiohttp", "baseline-httpcore": "httpcore"}
ALL_TARGETS = ["direct", *BASELINES, *policies.VARIANTS]
MODES = ("plain", "stream")


@dataclass(frozen=True)
class Config:
    targets: list[str]
    duration: float
    warmup: float
    concurrency: list[int]
    modes: list[str]
    tool: str
    pinning: procs.Pinning
    max_requests: int
    ttfb_samples: int
    ttfb_gap_ms: float
    output: Path | None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def guardproxy_available() -> tuple[bool, str]:
    try:
        done = subprocess.run([sys.executable, "-m", "guardproxy", "--help"],
                              capture_output=True, text=True, timeout=60, check=False,
                              cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stderr or done.stdout)[-500:]


class Bench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.env = {"PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.rows: list[report.Row] = []
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.target_info: dict[str, dict[str, Any]] = {}
        self.upstream: procs.Child | None = None
        self.upstream_port = 0
        self.redis: procs.Child | None = None
        self.redis_url: str | None = None

    # ------------------------------------------------------------------ processes
    def child(self, name: str, role: str, argv: list[str]) -> procs.Child:
        return procs.Child(name, [*self.cfg.pinning.prefix(role), *argv], self.work, self.env)

    def start_upstream(self) -> None:
        self.upstream_port = procs.free_port()
        self.upstream = self.child("upstream", "aux", procs.python_module(
            "bench.fake_upstream", "--port", str(self.upstream_port)))
        procs.wait_ready(self.upstream, self.upstream_port)

    def start_target(self, name: str) -> tuple[procs.Child | None, int]:
        """(process, port) of the system under test; no process for ``direct``."""
        upstream_url = f"http://{payloads.LOOPBACK}:{self.upstream_port}"
        if name == "direct":
            return None, self.upstream_port
        port = procs.free_port()
        if name in BASELINES:
            argv = procs.python_module("bench.baseline_proxy", "--upstream", upstream_url,
                                       "--port", str(port), "--transport", BASELINES[name])
        else:
            policy, notes = policies.write_policy(self.work / "policies", name, upstream_url,
                                                  self.redis_url)
            self.notes += [f"{name}: {n}" for n in notes]
            argv = procs.python_module("guardproxy", *policies.serve_args(policy, port))
        sut = self.child(name, "sut", argv)
        try:
            status = procs.wait_ready(sut, port)
        except Exception:
            sut.stop()
            raise
        if status != 200:
            self.notes.append(f"{name}: readiness probe answered HTTP {status}")
        self.target_info[name] = {"argv": argv, "ready_status": status,
                                  "rss_idle_mib": procs.rss_bytes(sut.pid) / 2**20}
        return sut, port

    def ensure_redis(self) -> None:
        if self.redis_url is None:
            self.redis, self.redis_url, note = procs.start_redis(self.cfg.pinning, self.work)
            self.notes.append(f"redis: {note}")

    def stop_all(self) -> None:
        for child in (self.redis, self.upstream):
            if child is not None:
                child.stop()

    # ------------------------------------------------------------------ measuring
    def cell(self, name: str, sut: procs.Child | None, port: int, mode: str,
             concurrency: int) -> report.Row:
        cfg, stream = self.cfg, mode == "stream"
        aux = cfg.pinning.prefix("aux")
        assert self.upstream is not None
        loadgen.run(cfg.tool, port, concurrency, cfg.warmup, stream, cfg.max_requests, aux,
                    self.work)
        pids = {"upstream": self.upstream.pid}
        if sut is not None:
            pids["proxy"] = sut.pid
        with procs.Meter(pids) as meter:
            res = loadgen.run(cfg.tool, port, concurrency, cfg.duration, stream,
                              cfg.max_requests, aux, self.work)
        row = report.Row(**asdict(res), target=name, mode=mode, concurrency=concurrency,
                         capped=res.requests >= cfg.max_requests)
        wall = meter.wall or 1.0
        requests = max(res.requests, 1)
        row.upstream_cpu_pct = 100 * meter.cpu["upstream"] / wall
        row.upstream_cpu_us_per_req = 1e6 * meter.cpu["upstream"] / requests
        if sut is not None:
            row.proxy_cpu_s = meter.cpu["proxy"]
            row.proxy_cpu_ms_per_req = 1000 * meter.cpu["proxy"] / requests
            row.proxy_cpu_pct = 100 * meter.cpu["proxy"] / wall
            row.proxy_rss_max_mib = meter.max_rss["proxy"] / 2**20
        return row

    def run_target(self, name: str) -> None:
        if name.startswith("guardproxy") and policies.VARIANTS[name].state == "redis":
            self.ensure_redis()
            if self.redis_url is None:
                self.skip(name, "no redis-server binary and nothing answers on 6379")
                return
        try:
            sut, port = self.start_target(name)
        except Exception as exc:
            self.skip(name, f"did not start: {exc}")
            return
        try:
            rows: list[report.Row] = []
            for mode in self.cfg.modes:
                for concurrency in self.cfg.concurrency:
                    log(f"  {name}: {mode} c={concurrency}")
                    try:
                        rows.append(self.cell(name, sut, port, mode, concurrency))
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        self.notes.append(f"{name} {mode} c={concurrency}: failed: {exc}")
                        log(f"    failed: {exc}")
                if sut is not None and not sut.alive():
                    raise RuntimeError(f"{name} died:\n{sut.log_tail()}")
            if "stream" in self.cfg.modes:
                log(f"  {name}: TTFB")
                result = ttfb.measure(port, self.cfg.ttfb_samples, max_seconds=20.0,
                                      gap_ms=self.cfg.ttfb_gap_ms)
                for row in rows:
                    if row.mode == "stream" and result.samples:
                        row.ttfb_p50_ms, row.ttfb_p99_ms = result.p50_ms, result.p99_ms
                        row.ttfb_samples = result.samples
                        row.ttfb_total_p50_ms = result.total_p50_ms
                if result.non2xx:
                    self.notes.append(f"{name}: TTFB probe got {result.non2xx} non-2xx")
            self.rows += rows
        except (RuntimeError, OSError) as exc:
            self.skip(name, str(exc))
        finally:
            if sut is not None:
                sut.stop()

    def skip(self, name: str, reason: str) -> None:
        """One line on stdout (the first and last lines of the reason), all of it on stderr
        and in the JSON."""
        self.skipped[name] = reason
        lines = [line.strip() for line in reason.strip().splitlines() if line.strip()] or [""]
        short = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        print(f"skipped: {name}: {short}", flush=True)
        log(reason)

    def run(self) -> None:
        wanted = self.cfg.targets
        if any(t.startswith("guardproxy") for t in wanted):
            ok, detail = guardproxy_available()
            if not ok:
                print("skipped: guardproxy not importable", flush=True)
                log(detail)
                for t in wanted:
                    if t.startswith("guardproxy"):
                        self.skipped[t] = "guardproxy not importable"
                wanted = [t for t in wanted if not t.startswith("guardproxy")]
        self.start_upstream()
        for name in sorted(wanted, key=lambda t: t != "direct"):  # direct first
            log(f"target {name}")
            self.run_target(name)
        report.add_deltas(self.rows)


def _tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def meta(cfg: Config, bench: Bench) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": _tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "loadgen": ("wrk -t1 (" + _tool_version(["wrk", "-v"]) + ")") if cfg.tool == "wrk"
        else "python aiohttp fallback (bench/loadgen.py)",
        "duration_s": cfg.duration, "warmup_s": cfg.warmup, "concurrency": cfg.concurrency,
        "modes": cfg.modes, "max_requests_per_cell": cfg.max_requests,
        "ttfb_samples": cfg.ttfb_samples, "ttfb_gap_ms": cfg.ttfb_gap_ms,
        "pinning": cfg.pinning.describe(),
        "upstream": "bench/fake_upstream.py (raw asyncio Protocol + httptools on uvloop); "
                    f"plain {len(payloads.completion_body())} B JSON, stream "
                    f"{len(payloads.stream_events())} SSE events "
                    f"({sum(map(len, payloads.stream_events()))} B)",
        "targets": bench.target_info, "skipped": bench.skipped, "notes": bench.notes,
    }


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(not 1 <= v <= 1024 for v in values):
        raise argparse.ArgumentTypeError("expected e.g. 1,32 (each 1..1024)")
    return values


def _names(text: str, allowed: list[str] | tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=lambda t: _names(t, ALL_TARGETS),
                        default=ALL_TARGETS, help=f"comma list of {', '.join(ALL_TARGETS)} "
                        "(default: all)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measured cell (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 32], help="default 1,32")
    parser.add_argument("--modes", type=lambda t: _names(t, MODES), default=list(MODES))
    parser.add_argument("--quick", action="store_true",
                        help="2 s cells and fewer TTFB samples (a smoke run)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--max-requests", type=int, default=2_000_000,
                        help="request cap per cell (default 2,000,000)")
    parser.add_argument("--ttfb-samples", type=int, default=None, help="default 150 (40 quick)")
    parser.add_argument("--ttfb-gap-ms", type=float, default=2.0,
                        help="upstream pause after the first SSE event in the TTFB probe")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default bench/results/overhead-<time>.json)")
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    if not 0 < duration <= 120 or not 0 < args.warmup <= 30:
        parser.error("--duration must be in (0, 120] and --warmup in (0, 30] seconds")
    if not 1 <= args.max_requests <= 50_000_000:
        parser.error("--max-requests must be in [1, 50,000,000]")
    tool = args.loadgen
    if tool == "auto":
        tool = "wrk" if loadgen.have_wrk() else "python"
    elif tool == "wrk" and not loadgen.have_wrk():
        parser.error("wrk not found (apt-get install -y wrk)")
    samples = args.ttfb_samples or (40 if args.quick else 150)
    return Config(targets=args.targets, duration=duration, warmup=args.warmup,
                  concurrency=args.concurrency, modes=args.modes, tool=tool,
                  pinning=procs.detect_pinning(not args.no_pin),
                  max_requests=args.max_requests, ttfb_samples=min(samples, 2000),
                  ttfb_gap_ms=min(max(args.ttfb_gap_ms, 0.0), 1000.0), output=args.output)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.pinning.pin_self()
    if cfg.tool != "wrk":
        log("wrk not found: using the python aiohttp load generator (slower; "
            "apt-get install -y wrk)")
    log(f"{cfg.pinning.describe()}")
    with tempfile.TemporaryDirectory(prefix="guardproxy-bench-") as tmp:
        bench = Bench(cfg, Path(tmp))
        try:
            bench.run()
        finally:
            bench.stop_all()
    info = meta(cfg, bench)
    path = report.write_json(bench.rows, info, cfg.output)
    print()
    print(report.table(bench.rows))
    if (shown := report.ratios(bench.rows)):
        print()
        print(shown)
    print()
    print(report.legend(info))
    for note in bench.notes:
        print(f"- note: {note}")
    for name, reason in bench.skipped.items():
        lines = [line.strip() for line in reason.strip().splitlines() if line.strip()] or [""]
        print(f"- skipped {name}: {lines[-1]}")
    print(f"\nJSON: {path}")
    return 0 if bench.rows else 1


if __name__ == "__main__":
    sys.exit(main())
