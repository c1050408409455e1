"""The hydra world through the live proxy: ``python -m bench.hydra_live [--accounts 5000]
[--hours 5] [--seed 1] [--concurrency 8] [--rate 0] [--out DIR]``.

Builds a world of ``bench/hydra_world.py`` (one day) and keeps its first ``--hours`` (at
most 24). Child processes on free 127.0.0.1 ports: a minimal model API (usage =
``max_tokens`` of the request: the built-in fake model stops at 4,096 words and a hydra
request costs 100,000 tokens) and the real proxy (``create_app`` under uvicorn,
``proxy_headers`` off as ``guardproxy serve`` does, behind a bench-only
``/_bench/linkage``: GET the enricher's counters and queue, POST a rebuild). Its policy:
``memory://``; the accounts file of ``bench.hydra.write_inputs`` (key ``bench-key-<id>``,
the world's attributes); ``trusted_proxies: [127.0.0.1/32]``, so the client IP is the
record's X-Forwarded-For; ``bench.hydra.LINKAGE`` as it is; an admin token; one rule,
``budget: <world budget>/day, count: completion, per: cluster`` (completion: the
reservation, ``max_tokens``, is then exactly the record's tokens).

Each record is one HTTP request (httpx, ``--concurrency`` in flight, taken in log order,
at most ``--rate`` a second): its account's key, X-Forwarded-For, headers, prompt as the
user message, ``max_tokens`` = its tokens. **Time is compressed**: the proxy runs on its
own clock, so hours of world time pass in a minute or two. Every budget falls in one day
window (the bench says so if the run crossed UTC midnight); co-activity finds nothing
(an account's requests fall in one or two onsets); the pair finder lags further behind
than it would in real time (queue peak reported). After the queue drains, each active
account's cluster is read through ``GET /admin/linkage/{account}``, once as the rules
saw it and once after a rebuild (ingest rebuilds every hour of log time and at its end;
the proxy's schedule is an hour of its own clock), and scored with ``bench.hydra``'s
functions, as is the same slice through ``bench.hydra.replay`` (the ingest engine).

One run (shared 2-core VM, other work running; condensed, the module prints Markdown
tables, per hydra too)::

    $ python -m bench.hydra_live
    world: 5,000 accounts, 15,382 requests in its first 5 h, seed 1
    - 15,382 requests in 54.4 s: 283 requests/s (latency p50 23.7 ms, p99 99.6 ms);
      statuses {200: 9623, 429: 5759}; benign accounts denied: 0 of 3771
    - time compressed 331x; the pair finder's queue peaked at 4,591 prompts (~90 min of
      world time behind), drained 9.5 s after the last answer; 0 dropped; 850 merges
      carried in 280 batches
    precision / recall (hydra pairs), false pairs:
      ingest (41 s, 377 records/s)      1.000 / 0.697, 2
      live, as the rules saw them       1.000 / 0.698, 6
      live, after a rebuild             1.000 / 0.697, 2
    (naive, reusing, offices 1.000 / 1.000 in all three; careful, very careful ~0)
    hydra take in budgets of one account, median, max, within 1.5x of 20:
      per: account                               8.1x  38.3x   1
      per: cluster, ingest, id counter           2.5x  35.9x   5
      per: cluster, ingest, members summed       1.6x  35.9x  10
      per: cluster, live proxy                   1.9x  35.9x   8

Live and ingest agree on clusters: the pairs only live are links made before their
value turned hot, which a rebuild drops (as ingest's last one did); co-activity needs
real time, which compressed time cannot show. The live take is close to the "members
summed" yardstick: the proxy carries usage across merges and links a naive hydra's new
account on its first request (co-held hot values are judged on the request path);
naive hydras take 1.0-1.6x, reusing ones 1.1-2.1x (what their parts spent before they
were linked); careful hydras, not linked, take what their account count gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import hydra
from bench.hydra_world import DAY, Population, World, build
from bench.procs import Child, free_port, python_module, wait_ready
from guardproxy.linkage.api import Graph, Link, LinkEvidence

LOOPBACK = "127.0.0.1"
STATUS_PATH = "/_bench/linkage"
DRAIN_TIMEOUT = 600.0   # seconds: the pair finder's queue must empty within this
Scope = dict[str, Any]


# -- the child processes ---------------------------------------------------------------
async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def upstream(scope: Scope, receive: Any, send: Any) -> None:
    """The model API: usage = the request's ``max_tokens`` (0 when absent)."""
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    cap = int(json.loads(b"".join(chunks) or b"{}").get("max_tokens") or 0)
    await _answer(send, 200, {
        "id": "chatcmpl-hydra", "object": "chat.completion", "created": 0,
        "model": "hydra-bench", "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": cap, "total_tokens": cap}})


class Instrumented:
    """The proxy, plus ``GET /_bench/linkage`` (the enricher's counters and queue size)
    and ``POST /_bench/linkage`` (rebuild the clusters now, as the enricher's schedule
    does every ``rebuild_every``; then the counters)."""

    def __init__(self, policy: Path) -> None:
        from guardproxy.app import create_app

        self.app = create_app(policy)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        enricher = self.app.guarded.linkage
        if scope["type"] == "http" and scope["path"] == STATUS_PATH and enricher:
            if scope["method"] == "POST":
                await enricher.rebuild()
            merges = getattr(enricher, "merges", None)   # the carry across merges, if any
            carry = {f"carry_{k}": v for k, v in asdict(merges.counters).items()} \
                if merges is not None else {}
            await _answer(send, 200, {**asdict(enricher.counters), **carry,
                                      "queue": enricher.queue.qsize()})
            return
        await self.app(scope, receive, send)


def serve(argv: list[str]) -> None:
    """``serve-upstream PORT`` or ``serve-proxy POLICY PORT`` (uvicorn, loopback)."""
    import uvicorn

    app: Any = upstream if argv[0] == "serve-upstream" else Instrumented(Path(argv[1]))
    uvicorn.run(app, host=LOOPBACK, port=int(argv[-1]), log_level="warning",
                access_log=False, proxy_headers=False, server_header=False,
                date_header=False, lifespan="off" if app is upstream else "on")


# -- inputs ------------------------------------------------------------------------------
def sliced(world: World, hours: float) -> Population:
    """The world's accounts and its requests of the first ``hours``."""
    pop = build(world)
    end = world.start + hours * 3600
    return Population(world, pop.members, [r for r in pop.requests if r.time < end])


def live_policy(out: Path, upstream_port: int, token: str, budget: int) -> Path:
    """policy-live.yaml next to the accounts file ``hydra.write_inputs`` wrote."""
    path = out / "policy-live.yaml"
    path.write_text(
        f"version: 1\nstate: memory://\nupstream: {{url: 'http://{LOOPBACK}:{upstream_port}'}}\n"
        f"accounts: {{keys: accounts.yaml}}\nclients: {{trusted_proxies: [{LOOPBACK}/32]}}\n"
        f"admin: {{token: {token}}}\n" + hydra.LINKAGE
        + f"rules:\n  - name: hydra-tokens\n    budget: {budget}/day\n"
        "    count: completion\n    per: cluster\n")
    return path


# -- the live replay ---------------------------------------------------------------------
@dataclass
class LiveRun:
    graph: Graph                 # the clusters the rules acted on, read after the replay
    rebuilt: Graph               # the same after a rebuild from live evidence
    statuses: list[int]          # per request, in log order (0: no answer)
    latencies: list[float]       # seconds, per request
    seconds: float               # first request sent to last answer
    drain_seconds: float         # then until the pair finder's queue was empty
    queue_peak: int              # the most prompts waiting for the pair finder (sampled)
    counters: dict[str, int]     # the enricher's, after the drain
    crossed_midnight: bool       # the proxy's day window changed during the replay


async def _send_all(client: httpx.AsyncClient, pop: Population, concurrency: int,
                    rate: float) -> tuple[list[int], list[float]]:
    """Every request, ``concurrency`` in flight, at most ``rate`` a second (0: no cap);
    (statuses, latencies in seconds) in log order."""
    statuses, latencies = [0] * len(pop.requests), [0.0] * len(pop.requests)
    todo = iter(enumerate(pop.requests))    # shared: workers take records in log order
    t0 = time.perf_counter()

    async def worker() -> None:
        for i, r in todo:
            if rate > 0 and (wait := t0 + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            body = {"model": "hydra-bench", "max_tokens": r.tokens,
                    "messages": [{"role": "user", "content": r.prompt}]}
            headers = {**r.headers, "authorization": f"Bearer bench-key-{r.account}",
                       "x-forwarded-for": r.ip}
            started = time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=body,
                                             headers=headers)
                statuses[i] = response.status_code
            except httpx.HTTPError:
                statuses[i] = 0
            latencies[i] = time.perf_counter() - started

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, latencies


async def read_graph(client: httpx.AsyncClient, accounts: list[str], token: str) -> Graph:
    """Every cluster of 2+ accounts among ``accounts``, via ``GET /admin/linkage/{id}``."""
    clusters, done = [], set()
    auth = {"authorization": f"Bearer {token}"}
    for account in accounts:
        if account in done:
            continue
        response = await client.get(f"/admin/linkage/{account}", headers=auth)
        response.raise_for_status()
        report = response.json()
        done.update(report["members"])
        if len(report["members"]) > 1:
            links = tuple(Link(x["a"], x["b"], tuple(LinkEvidence(**e) for e in x["evidence"]))
                          for x in report["links"])
            clusters.append((report["cluster"]["id"], tuple(report["members"]), links))
    return Graph(tuple(sorted(clusters)))


async def _replay_live(pop: Population, port: int, token: str, concurrency: int,
                       rate: float) -> LiveRun:
    limits = httpx.Limits(max_connections=concurrency + 1)   # + 1: the queue sampler
    async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}", limits=limits,
                                 timeout=60.0) as client:
        peak = [0]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], (await client.get(STATUS_PATH)).json()["queue"])
                await asyncio.sleep(0.5)

        day, started = int(time.time() // DAY), time.perf_counter()
        sampler = asyncio.create_task(sample())
        statuses, latencies = await _send_all(client, pop, concurrency, rate)
        seconds = time.perf_counter() - started
        sampler.cancel()
        crossed = int(time.time() // DAY) != day
        while True:   # the pair finder lags behind the answers: let it finish
            counters = (await client.get(STATUS_PATH)).json()
            if counters["queue"] == 0:
                break
            if time.perf_counter() - started - seconds > DRAIN_TIMEOUT:
                raise RuntimeError(f"pair finder queue not drained: {counters}")
            await asyncio.sleep(0.2)
        drain = time.perf_counter() - started - seconds
        active = sorted({r.account for r in pop.requests})
        graph = await read_graph(client, active, token)
        (await client.post(STATUS_PATH)).raise_for_status()
        rebuilt = await read_graph(client, active, token)
    return LiveRun(graph, rebuilt, statuses, latencies, seconds, drain, peak[0], counters,
                   crossed)


def run_live(pop: Population, out: Path, concurrency: int = 8, rate: float = 0.0) -> LiveRun:
    """Start the upstream and the proxy (``out`` holds accounts.yaml; logs go there too),
    replay ``pop.requests``, read the clusters back, stop both children."""
    token = secrets.token_urlsafe(16)
    up_port, proxy_port = free_port(), free_port()
    children = [Child("upstream", python_module("bench.hydra_live", "serve-upstream",
                                                str(up_port)), out)]
    try:
        wait_ready(children[0], up_port)   # a chat request answered 200
        policy = live_policy(out, up_port, token, pop.world.budget)
        children.append(Child("proxy", python_module(
            "bench.hydra_live", "serve-proxy", str(policy), str(proxy_port)), out))
        wait_ready(children[1], proxy_port)   # 401: the probe's key is not an account
        return asyncio.run(_replay_live(pop, proxy_port, token, concurrency, rate))
    finally:
        for child in children:
            child.stop()


# -- the report --------------------------------------------------------------------------
def live_takes(pop: Population, run: LiveRun) -> tuple[dict[str, int], set[str], int, int]:
    """Tokens served per hydra; benign accounts denied, their tokens denied and asked."""
    members = pop.by_id()
    take: dict[str, int] = defaultdict(int)
    denied: set[str] = set()
    tokens_denied = tokens = 0
    for r, status in zip(pop.requests, run.statuses, strict=True):
        member = members[r.account]
        if member.kind == "hydra":
            take[member.actor] += r.tokens if status == 200 else 0
            continue
        tokens += r.tokens
        if status != 200:
            denied.add(r.account)
            tokens_denied += r.tokens
    return take, denied, tokens_denied, tokens


def take_table(pop: Population, ingest: hydra.Run, live: dict[str, int]) -> list[str]:
    """Per hydra, tokens served over one account's budget: ``per: account`` and the two
    ``per: cluster`` yardsticks of ``bench.hydra`` (the id's own counter; the members'
    use summed, as a carry across merges gives), then the live proxy's."""
    budget = pop.world.budget
    hydras = sorted({m.actor for m in pop.members if m.kind == "hydra"})
    active = {r.account for r in pop.requests}
    columns = {"ingest, id counter": [ingest.take[(h, "cluster", 0)] for h in hydras],
               "ingest, members summed": [ingest.take[(h, "summed", 0)] for h in hydras],
               "live proxy": [live[h] for h in hydras]}
    rows = ["| hydra | active accounts | per: account | "
            + " | ".join(f"per: cluster, {c}" for c in columns) + " |",
            "|---|---:|---:|" + "---:|" * len(columns)]
    for i, h in enumerate(hydras):
        n = sum(1 for m in pop.members if m.actor == h and m.id in active)
        rows.append(f"| {h} | {n} | {ingest.take[(h, 'account', 0)] / budget:.1f}x | "
                    + " | ".join(f"{v[i] / budget:.1f}x" for v in columns.values()) + " |")
    rows.append("")
    accounts = {"per: account": [ingest.take[(h, "account", 0)] for h in hydras]}
    for name, takes in {**accounts, **{f"per: cluster, {c}": v
                                        for c, v in columns.items()}}.items():
        x = [t / budget for t in takes]
        rows.append(f"- {name}: median {statistics.median(x):.1f}x, max "
                    f"{max(x):.1f}x, {sum(1 for v in x if v <= 1.5)}/{len(x)} within 1.5x")
    return rows


def _pairs(clusters: Any) -> dict[str, str]:
    return {a: cid for cid, accounts, _ in clusters for a in accounts}


def agreement(ingest: Graph, live: Graph) -> str:
    """Pairs of accounts in one cluster in both graphs, and in only one of them."""
    a, b = _pairs(ingest.clusters), _pairs(live.clusters)
    both = Counter((a[x], b[x]) for x in a.keys() & b.keys())
    common = sum(math.comb(n, 2) for n in both.values())
    sizes = [sum(math.comb(n, 2) for n in Counter(g.values()).values()) for g in (a, b)]
    return (f"account pairs in one cluster: both {common:,}, only ingest "
            f"{sizes[0] - common:,}, only live {sizes[1] - common:,}")


def signal_table(graphs: dict[str, Graph]) -> list[str]:
    """Links carrying each signal, per graph."""
    counts = {name: Counter(e.signal for _, _, links in g.clusters for link in links
                            for e in link.evidence) for name, g in graphs.items()}
    rows = ["| link signal | " + " | ".join(f"links, {n}" for n in graphs) + " |",
            "|---|" + "---:|" * len(graphs)]
    for signal in sorted(set().union(*counts.values())):
        rows.append(f"| {signal} | " + " | ".join(f"{c[signal]:,}" for c in counts.values())
                    + " |")
    return rows


def report(pop: Population, ingest: hydra.Run, live: LiveRun) -> list[str]:
    n = len(pop.requests)
    statuses = Counter(live.statuses)
    take, denied, tokens_denied, tokens = live_takes(pop, live)
    benign = sum(1 for m in pop.members if m.kind != "hydra")
    lat = sorted(live.latencies)
    world_seconds = max(r.time for r in pop.requests) - pop.world.start
    c = live.counters
    return [
        "## Live proxy", "",
        f"- {n:,} requests in {live.seconds:.1f} s: **{n / live.seconds:.0f} requests/s** "
        f"(latency p50 {lat[n // 2] * 1e3:.1f} ms, p99 {lat[int(n * 0.99)] * 1e3:.1f} ms); "
        f"statuses {dict(sorted(statuses.items()))}",
        f"- time compressed {world_seconds / live.seconds:.0f}x ({world_seconds / 3600:.1f} h "
        f"of world time in {live.seconds:.0f} s); the pair finder's queue peaked at "
        f"{live.queue_peak:,} prompts (≈ {live.queue_peak / n * world_seconds / 60:.0f} min "
        f"of world time behind) and drained {live.drain_seconds:.1f} s after the last answer"
        + ("; THE PROXY'S DAY WINDOW CHANGED during the run: budgets restarted" if
           live.crossed_midnight else ""),
        "- linkage enricher counters (`dropped`: prompts lost to a full queue): "
        + ", ".join(f"{k} {v:,}" for k, v in c.items() if k != "queue"),
        f"- benign accounts denied: {len(denied)} of {benign} "
        f"({hydra.ratio(tokens_denied, tokens)} of their tokens)", "",
        "## Recovered clusters, ingest (`bench.hydra.replay`, "
        f"{ingest.seconds:.0f} s, {n / ingest.seconds:.0f} records/s)", "",
        *hydra.quality_table(pop, ingest.graph), "",
        "## Recovered clusters, live (`GET /admin/linkage/{account}`), as the rules saw "
        "them", "", *hydra.quality_table(pop, live.graph), "",
        "## Recovered clusters, live, after a rebuild from live evidence", "",
        *hydra.quality_table(pop, live.rebuilt), "",
        "## Ingest vs live", "",
        f"- live as the rules saw them: {agreement(ingest.graph, live.graph)}",
        f"- live after the rebuild: {agreement(ingest.graph, live.rebuilt)}", "",
        *signal_table({"ingest": ingest.graph, "live": live.graph,
                       "live rebuilt": live.rebuilt}), "",
        "Links between two actors, ingest:", "", *hydra.false_links(pop, ingest.graph), "",
        "Links between two actors, live after the rebuild:", "",
        *hydra.false_links(pop, live.rebuilt), "",
        "## Hydra take (tokens served / one account's budget)", "",
        *take_table(pop, ingest, take),
        f"- ingest: benign accounts denied {len(ingest.benign_denied)} "
        f"({hydra.ratio(ingest.benign_tokens_denied, ingest.benign_tokens)} of their tokens)",
    ]


def main() -> None:
    if sys.argv[1:2] in (["serve-upstream"], ["serve-proxy"]):
        serve(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=5000)
    parser.add_argument("--hours", type=float, default=5.0,
                        help="World hours to replay, at most 24 (one budget day).")
    parser.add_argument("--seed", type=int, default=World.seed)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="Requests/s at most (default 0: as fast as the proxy answers).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Keep the accounts file, policies, log and child logs here.")
    args = parser.parse_args()
    if not 0 < args.hours <= 24:
        parser.error("--hours must be in (0, 24]: the take comparison is over one day")
    with tempfile.TemporaryDirectory(prefix="hydra-live-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        pop = sliced(World(accounts=args.accounts, seed=args.seed, days=1), args.hours)
        policy, log = hydra.write_inputs(pop, out)
        print(f"world: {len(pop.members):,} accounts, {len(pop.requests):,} requests in its "
              f"first {args.hours:g} h, seed {args.seed}", file=sys.stderr)
        live = run_live(pop, out, args.concurrency, args.rate)
        print(f"live: {live.seconds:.0f} s", file=sys.stderr)
        (out / "live-export.json").write_text(json.dumps(live.graph.as_json()))
        (out / "live-rebuilt-export.json").write_text(json.dumps(live.rebuilt.as_json()))
        ingest = hydra.replay(pop, policy, log)
        (out / "export.json").write_text(json.dumps(ingest.graph.as_json()))
        print("\n".join(report(pop, ingest, live)))


if __name__ == "__main__":
    main()
