"""Hydra benchmark: ``python -m bench.hydra [--accounts 10000] [--seed N] [--days 2]``.

Builds the simulated world of ``bench/hydra_world.py`` (every parameter in its
``World``), writes an accounts file, a policy (the issue's example ``linkage:`` section,
weights as they are, and its ``hydra-tokens`` rule) and a JSON-lines log in the ingest
format, then replays the log through ``guardproxy ingest``: in process (to read each
request's cluster as it forms, for the budget arithmetic) and once as a subprocess of
the real CLI (its ``--export`` must equal the in-process graph). It reports:

* pairwise precision and recall of the recovered clusters against the actors, overall
  and per level of care (recall over hydra pairs; precision over every linked pair; an
  office's accounts are one actor: its org is declared);
* the signals behind the links inside each level's hydras;
* the hot values found, by signal and by who held them;
* each hydra's token take per day with ``per: account`` and with ``per: cluster``
  budgets (the rule's limit, each request charged to the cluster it had *when it was
  made*: clusters forming during the day leave the take of earlier requests where it
  was), as multiples of one account's budget; and what per-cluster budgets cost
  benign accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from bench.hydra_world import DAY, LEVELS, Population, World, build
from guardproxy.cli.ingest import Replay, read_records
from guardproxy.linkage.api import Cluster, Graph
from guardproxy.linkage.evidence import observe
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Account

LINKAGE = """\
linkage:
  secret: hydra-bench-secret-not-for-production
  window: 30d
  threshold: 1.0
  signals:
    - {attribute: payment, weight: 1.0, max_fanout: 5}
    - {attribute: email, weight: 1.0}
    - {attribute: phone, weight: 1.0}
    - {ip: exact, weight: 0.5, max_fanout: 20}
    - {ip: /24, weight: 0.3, max_fanout: 20}
    - {header: x-device-id, weight: 0.6, max_fanout: 5}
    - {header: x-ja4, weight: 0.3, max_fanout: 50}
    - {prompt_similarity: 0.8, weight: 0.25, min_pairs: 5}
    - {co_activity: 60s, weight: 0.25, min_events: 5}
"""


def write_inputs(pop: Population, out: Path) -> tuple[Path, Path]:
    """accounts.yaml, policy.yaml and log.jsonl in ``out``; (policy, log)."""
    accounts = [{"id": m.id, "org": m.org or m.id, "tier": "default",
                 "key_sha256": hashlib.sha256(f"bench-key-{m.id}".encode()).hexdigest(),
                 "attributes": dict(m.attributes)} for m in pop.members]
    with (out / "accounts.yaml").open("w", encoding="utf-8") as f:
        yaml.dump({"accounts": accounts}, f, Dumper=yaml.CSafeDumper, sort_keys=False)
    policy = out / "policy.yaml"
    policy.write_text("version: 1\nstate: memory://\naccounts: {keys: accounts.yaml}\n"
                      + LINKAGE + "rules:\n  - name: hydra-tokens\n"
                      f"    budget: {pop.world.budget}/day\n    per: cluster\n")
    log = out / "log.jsonl"
    with log.open("w", encoding="utf-8") as f:
        for r in pop.requests:
            f.write(json.dumps({"time": r.time, "account": r.account, "ip": r.ip,
                                "headers": r.headers, "prompt": r.prompt}) + "\n")
    return policy, log


@dataclass
class Budgets:
    """Fixed daily windows (as the budget rule's ``/day``): a request is allowed when
    its cost still fits the key's window."""

    limit: int

    def __post_init__(self) -> None:
        self.used: dict[tuple[str, int], int] = defaultdict(int)

    def take(self, key: str, when: float, cost: int) -> bool:
        slot = (key, int(when // DAY))
        if self.used[slot] + cost > self.limit:
            return False
        self.used[slot] += cost
        return True


@dataclass
class SummedBudgets:
    """``per: cluster`` had the cluster's usage been the sum of its members' (a merge
    carrying what the merged clusters spent) instead of the counter of its id: the
    bench's yardstick for the id-keyed rule, not what the proxy does."""

    limit: int

    def __post_init__(self) -> None:
        self.used: dict[tuple[str, int], int] = defaultdict(int)
        self.sums: dict[tuple[str, int, int], int] = {}   # (cluster id, size, day) -> used

    def take(self, account: str, cluster: Cluster, members: Callable[[], list[str]],
             when: float, cost: int) -> bool:
        day = int(when // DAY)
        key = (cluster.id, cluster.size, day)
        total = self.sums.get(key)
        if total is None:
            total = sum(self.used[(m, day)] for m in members())
        if total + cost > self.limit:
            self.sums[key] = total
            return False
        self.used[(account, day)] += cost
        self.sums[key] = total + cost
        return True


@dataclass
class Run:
    graph: Graph
    take: dict[tuple[str, str, int], int]          # (actor, budget per, day) -> tokens
    benign_denied: set[str]
    benign_tokens_denied: int
    benign_tokens: int
    hot_owner: dict[tuple[str, str], set[str]]     # (signal, digest) -> actors showing it
    seconds: float


def replay(pop: Population, policy_path: Path, log: Path) -> Run:
    """Feed the log to ``ingest``'s engine, charging budgets as clusters form."""
    return asyncio.run(_replay(pop, policy_path, log))


async def _replay(pop: Population, policy_path: Path, log: Path) -> Run:
    policy = load_policy(policy_path)
    settings = policy.linkage
    assert settings is not None
    accounts: dict[str, Account] = {a.id: a for a in policy.keys.values()}
    members = pop.by_id()
    engine = Replay(settings, accounts)
    graph = engine.graph
    assert graph is not None
    per_account, per_cluster = Budgets(pop.world.budget), Budgets(pop.world.budget)
    summed = SummedBudgets(pop.world.budget)
    take: dict[tuple[str, str, int], int] = defaultdict(int)
    owners: dict[tuple[str, str], set[str]] = defaultdict(set)
    denied: set[str] = set()
    tokens_denied = tokens = 0

    def bad(name: str, line: int, reason: str) -> None:
        raise SystemExit(f"{name}:{line}: {reason} (the bench wrote this log)")

    started = time.perf_counter()
    with log.open("rb") as f:
        for request, record in zip(pop.requests, read_records(f, str(log), bad), strict=True):
            member = members[record.account]
            for ev in observe(settings, accounts[record.account], record.ip, record.headers):
                owners[(ev.signal, ev.digest)].add(member.actor)
            cluster = await engine.feed(record)
            day = int((record.time - pop.world.start) // DAY)
            cost = request.tokens
            if per_account.take(record.account, record.time, cost):
                take[(member.actor, "account", day)] += cost
            if per_cluster.take(cluster.id, record.time, cost):
                take[(member.actor, "cluster", day)] += cost
            elif member.kind != "hydra":
                denied.add(member.id)
                tokens_denied += cost
            now = graph.cluster(record.account)   # with this request's pairs
            if summed.take(record.account, now, partial(graph.members, record.account),
                           record.time, cost):
                take[(member.actor, "summed", day)] += cost
            if member.kind != "hydra":
                tokens += cost
    seconds = time.perf_counter() - started
    return Run(await engine.finish(), take, denied, tokens_denied, tokens, owners, seconds)


def group_of(pop: Population) -> dict[str, str]:
    """Actor -> its group: a level of care, "office" or "benign"."""
    return {m.actor: m.level or ("office" if m.kind == "office" else "benign")
            for m in pop.members}


def pair_counts(pop: Population, graph: Graph) -> dict[str, Counter[str]]:
    """Per group: ``true`` pairs (one actor, both accounts active in the log: an account
    that sent nothing cannot be found), ``found`` (one actor, one cluster) and
    ``false`` (one cluster, two actors, at least one of them in the group)."""
    actor = {m.id: m.actor for m in pop.members}
    active = {r.account for r in pop.requests}
    groups = group_of(pop)
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for name, n in Counter(actor[a] for a in active).items():
        out[groups[name]]["true"] += math.comb(n, 2)
    for _, accounts, _ in graph.clusters:
        by_actor = Counter(actor[a] for a in accounts)
        by_group = Counter(groups[actor[a]] for a in accounts)
        same: Counter[str] = Counter()
        for name, k in by_actor.items():
            same[groups[name]] += math.comb(k, 2)
        for g, n in by_group.items():
            out[g]["found"] += same[g]
            out[g]["false"] += math.comb(n, 2) - same[g] + n * (len(accounts) - n)
        out["all"]["false"] += math.comb(len(accounts), 2) - sum(same.values())
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def quality_table(pop: Population, graph: Graph) -> list[str]:
    counts = pair_counts(pop, graph)
    rows = ["| group | actors | accounts | true pairs | found | false pairs touching "
            "| precision | recall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = group_of(pop)
    for g in (*LEVELS, "office", "benign"):
        c = counts[g]
        actors = [a for a, x in groups.items() if x == g]
        accounts = sum(1 for m in pop.members if groups[m.actor] == g)
        precision = ratio(c["found"], c["found"] + c["false"]) if c["true"] else "n/a"
        rows.append(f"| {g} | {len(actors)} | {accounts} | {c['true']:,} | {c['found']:,} "
                    f"| {c['false']:,} | {precision} | {ratio(c['found'], c['true'])} |")
    found = sum(counts[g]["found"] for g in counts if g != "all")
    hydra_found = sum(counts[g]["found"] for g in LEVELS)
    hydra_true = sum(counts[g]["true"] for g in LEVELS)
    rows.append(f"| **overall** (recall: hydra pairs) | | {len(pop.members)} | "
                f"{hydra_true:,} | {hydra_found:,} | {counts['all']['false']:,} | "
                f"**{ratio(found, found + counts['all']['false'])}** | "
                f"**{ratio(hydra_found, hydra_true)}** |")
    return rows


PERS = ("account", "cluster", "summed")
LABELS = {"account": "per: account", "cluster": "per: cluster (counter of the cluster id)",
          "summed": "per: cluster with the members' use summed (merges carry it)"}


def hydra_table(pop: Population, run: Run) -> list[str]:
    """Per hydra: recovery, the signals of its links, its take per day (x one budget)."""
    w = pop.world
    cluster_of = {a: cid for cid, accounts, _ in run.graph.clusters for a in accounts}
    links: dict[str, Counter[str]] = defaultdict(Counter)
    members = pop.by_id()
    for _, _, cluster_links in run.graph.clusters:
        for link in cluster_links:
            if members[link.a].actor == members[link.b].actor:
                links[members[link.a].actor].update(e.signal for e in link.evidence)
    days = " | ".join(f"day {d + 1}: {per}" for d in range(w.days) for per in PERS)
    rows = [f"| hydra | accounts | largest cluster | + other hydras' | + benign | "
            f"link signals | {days} |", "|---|---:|---:|---:|---:|---|"
            + "---:|" * (len(PERS) * w.days)]
    for name in sorted({m.actor for m in pop.members if m.kind == "hydra"}):
        mine = [m.id for m in pop.members if m.actor == name]
        cid, largest = Counter(cluster_of.get(a, a) for a in mine).most_common(1)[0]
        others = [members[a] for a, c in cluster_of.items() if c == cid
                  and members[a].actor != name]
        hydras = sum(1 for m in others if m.kind == "hydra")
        signals = ", ".join(f"{s.split(':')[-1]} {n}" for s, n in links[name].most_common(4))
        takes = " | ".join(f"{run.take[(name, per, d)] / w.budget:.1f}x"
                           for d in range(w.days) for per in PERS)
        rows.append(f"| {name} | {len(mine)} | {largest} | {hydras} | {len(others) - hydras} "
                    f"| {signals or '-'} | {takes} |")
    return rows


def false_links(pop: Population, graph: Graph, top: int = 8) -> list[str]:
    """Links between two actors, by the signals that made them and who the two were."""
    members = pop.by_id()
    made: Counter[tuple[str, str]] = Counter()
    for _, _, links in graph.clusters:
        for link in links:
            a, b = members[link.a], members[link.b]
            if a.actor != b.actor:
                who = " - ".join(sorted("hydra" if m.kind == "hydra" else m.kind
                                        for m in (a, b)))
                made[(who, " + ".join(sorted(e.signal for e in link.evidence)))] += 1
    rows = ["| between | signals | links |", "|---|---|---:|"]
    rows += [f"| {who} | {signals} | {n} |" for (who, signals), n in made.most_common(top)]
    return rows if made else ["no link between two actors"]


def hot_table(pop: Population, run: Run) -> list[str]:
    """Hot values by signal, and whose they were: one hydra's own (evidence the fan-out
    guard threw away), benign (the guard's purpose), or mixed (hydras with strangers)."""
    groups = group_of(pop)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for hot in run.graph.hot_values:
        actors = run.hot_owner.get((hot.signal, hot.digest), set())
        hydras = {a for a in actors if groups[a] in LEVELS}
        kind = "one hydra" if len(actors) == 1 and hydras else \
            "benign" if not hydras else "hydras only" if hydras == actors else "mixed"
        kinds[hot.signal][kind] += 1
    rows = ["| signal | hot values | one hydra's own | hydras only | benign | "
            "hydras mixed with strangers |", "|---|---:|---:|---:|---:|---:|"]
    for signal, c in sorted(kinds.items()):
        rows.append(f"| {signal} | {sum(c.values())} | {c['one hydra']} | {c['hydras only']} "
                    f"| {c['benign']} | {c['mixed']} |")
    return rows


def summary_lines(pop: Population, run: Run) -> list[str]:
    w = pop.world
    hydras = sorted({m.actor for m in pop.members if m.kind == "hydra"})
    lines = []
    for d in range(w.days):
        parts = []
        for per in PERS:
            takes = [run.take[(h, per, d)] / w.budget for h in hydras]
            within = sum(1 for x in takes if x <= 1.5)
            parts.append(f"{LABELS[per]}: median {statistics.median(takes):.1f}x, max "
                         f"{max(takes):.1f}x, {within}/{len(hydras)} within 1.5x")
        lines.append(f"- day {d + 1}, hydra take in budgets of one account: " + "; ".join(parts))
    benign = sum(1 for m in pop.members if m.kind != "hydra")
    lines.append(f"- benign accounts denied by per-cluster budgets: {len(run.benign_denied)} of "
                 f"{benign} ({ratio(run.benign_tokens_denied, run.benign_tokens)} of their "
                 "tokens)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=World.accounts)
    parser.add_argument("--seed", type=int, default=World.seed)
    parser.add_argument("--days", type=int, default=World.days)
    parser.add_argument("--out", type=Path, default=None,
                        help="Keep the accounts file, policy, log and exports here.")
    parser.add_argument("--no-subprocess", action="store_true",
                        help="Skip the run of the real 'guardproxy ingest' CLI.")
    args = parser.parse_args()
    world = World(accounts=args.accounts, seed=args.seed, days=args.days)
    with tempfile.TemporaryDirectory(prefix="hydra-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pop = build(world)
        policy, log = write_inputs(pop, out)
        print(f"world: {len(pop.members):,} accounts, {len(pop.requests):,} requests over "
              f"{world.days} day(s), seed {world.seed} "
              f"({time.perf_counter() - started:.0f} s to build)", file=sys.stderr)
        child = None if args.no_subprocess else subprocess.Popen(
            [sys.executable, "-m", "guardproxy", "ingest", "--policy", str(policy), str(log),
             "--export", str(out / "cli-export.json")], stdout=subprocess.PIPE, text=True)
        run = replay(pop, policy, log)
        (out / "export.json").write_text(json.dumps(run.graph.as_json()))
        print(f"in-process ingest: {run.seconds:.0f} s "
              f"({run.seconds / len(pop.requests) * 1e6:.0f} us per record)", file=sys.stderr)
        report = ["## Recovered clusters (pairwise)", "", *quality_table(pop, run.graph), "",
                  "## Hydras", "", *hydra_table(pop, run), "", *summary_lines(pop, run), "",
                  "## Links between two actors", "", *false_links(pop, run.graph), "",
                  "## Hot values", "", *hot_table(pop, run)]
        if child is not None:
            stdout, _ = child.communicate()
            same = child.returncode == 0 and json.loads(
                (out / "cli-export.json").read_text()) == run.graph.as_json()
            report += ["", f"`guardproxy ingest` subprocess: exit {child.returncode}, "
                       f"export {'identical to' if same else 'DIFFERS from'} the in-process "
                       f"graph; its summary: {stdout.strip()}"]
        print("\n".join(report))


if __name__ == "__main__":
    main()
