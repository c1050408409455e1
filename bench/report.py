"""Results of the overhead bench: one ``Row`` per target x cell, a Markdown table, JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row(LoadResult):
    """One load run (the LoadResult fields) of one target in one cell, and what the
    bench measured around it."""

    target: str
    mode: str  # "plain" or "stream"
    concurrency: int
    capped: bool  # the request cap was hit before the duration (rps is then understated)
    proxy_cpu_s: float | None = None  # CPU seconds of the proxy process over the cell
    proxy_cpu_ms_per_req: float | None = None
    proxy_cpu_pct: float | None = None  # of one core
    proxy_rss_max_mib: float | None = None
    upstream_cpu_pct: float | None = None
    upstream_cpu_us_per_req: float | None = None
    added_p50_ms: float | None = None  # vs the direct target, same cell
    added_p99_ms: float | None = None
    ttfb_p50_ms: float | None = None  # stream rows only; measured separately at concurrency 1
    ttfb_p99_ms: float | None = None
    ttfb_added_p50_ms: float | None = None
    ttfb_samples: int | None = None
    ttfb_total_p50_ms: float | None = None  # the whole TTFB-probe stream, gap included


def add_deltas(rows: list[Row]) -> None:
    """Fill the added-latency fields from the direct rows of the same cell."""
    direct = {(r.mode, r.concurrency): r for r in rows if r.target == "direct"}
    for row in rows:
        base = direct.get((row.mode, row.concurrency))
        if base is None:
            continue
        row.added_p50_ms = row.p50_ms - base.p50_ms
        row.added_p99_ms = row.p99_ms - base.p99_ms
        if row.ttfb_p50_ms is not None and base.ttfb_p50_ms is not None:
            row.ttfb_added_p50_ms = row.ttfb_p50_ms - base.ttfb_p50_ms


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


HEADER = ("| target | mode | conc | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms "
          "| TTFB p50 / p99 ms | +TTFB p50 | CPU ms/req | proxy CPU % | upstream CPU % "
          "| RSS max MiB | non-2xx |")


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        ttfb = "—" if r.ttfb_p50_ms is None else f"{r.ttfb_p50_ms:.2f} / {r.ttfb_p99_ms:.2f}"
        non2xx = str(r.non2xx) + (f" (+{r.errors} socket err)" if r.errors else "")
        rps = f"{r.rps:,.0f}" + (" (capped)" if r.capped else "")
        lines.append(
            f"| {r.target} | {r.mode} | {r.concurrency} | {rps} | {_num(r.p50_ms)} "
            f"| {_num(r.p99_ms)} | {_num(r.added_p50_ms, signed=True)} "
            f"| {_num(r.added_p99_ms, signed=True)} | {ttfb} "
            f"| {_num(r.ttfb_added_p50_ms, signed=True)} | {_num(r.proxy_cpu_ms_per_req, 3)} "
            f"| {_num(r.proxy_cpu_pct, 0)} | {_num(r.upstream_cpu_pct, 0)} "
            f"| {_num(r.proxy_rss_max_mib, 1)} | {non2xx} |")
    return "\n".join(lines)


# (numerator, denominator, target): the ratios issue 12 sets, req/s of one run
RATIOS = (("guardproxy-full-redis", "guardproxy-full", 0.7),
          ("guardproxy-full", "baseline", 0.8),
          ("guardproxy-default-redis-lifted", "guardproxy-default-lifted", 0.7),
          ("guardproxy-default-lifted", "baseline", 0.8))


def ratios(rows: list[Row]) -> str:
    """req/s ratios per cell for the pairs in ``RATIOS`` that this run measured (a
    Markdown table; empty when none), each against its target."""
    rps = {(r.target, r.mode, r.concurrency): r.rps for r in rows}
    cells = sorted({(r.mode, r.concurrency) for r in rows})
    lines = []
    for top, bottom, target in RATIOS:
        values = [(rps.get((top, m, c)), rps.get((bottom, m, c))) for m, c in cells]
        if all(a is None or b is None for a, b in values):
            continue
        shown = [f"{a / b:.2f}" + (" ✅" if a / b >= target else " ❌") if a and b else "—"
                 for a, b in values]
        lines.append(f"| {top} / {bottom} (≥ {target}) | " + " | ".join(shown) + " |")
    if not lines:
        return ""
    head = "| ratio of req/s | " + " | ".join(f"{m} c={c}" for m, c in cells) + " |"
    return "\n".join([head, "|---|" + "---|" * len(cells), *lines])


def legend(meta: dict[str, Any]) -> str:
    return "\n".join([
        f"- load: {meta['loadgen']}, closed loop, {meta['duration_s']:g} s per cell after a "
        f"{meta['warmup_s']:g} s warm-up; latencies are full request/response times "
        "(whole stream for `stream`).",
        "- +p50/+p99: minus the `direct` row of the same cell (percentiles do not subtract "
        "exactly; read them as an estimate).",
        f"- TTFB: separate run at concurrency 1 ({meta['ttfb_samples']} samples), send -> "
        f"first SSE event; the upstream waits {meta['ttfb_gap_ms']:g} ms after that event, "
        "so a proxy that buffered the stream would show TTFB >= that gap (JSON: "
        "ttfb_total_p50_ms is the whole probe stream). Idle gaps make every process on this "
        "VM slower to wake up, so TTFB is a little above the c=1 stream p50.",
        "- CPU ms/req: utime+stime of the proxy process over the cell / requests; "
        "CPU % is of one core (100 = the proxy's core is saturated).",
        f"- {meta['pinning']}.",
    ])


def write_json(rows: list[Row], meta: dict[str, Any], path: Path | None = None) -> Path:
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
                    + "\n")
    return path
