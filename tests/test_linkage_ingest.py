"""``guardproxy ingest`` and ``guardproxy linkage``: backfill from history, read the graph."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guardproxy.cli import main
from guardproxy.cli.ingest import EARLIEST, MAX_AHEAD, parse_record, parse_time
from guardproxy.cli.linkage import dot, graphml
from guardproxy.linkage.api import Graph, Link, LinkEvidence
from guardproxy.linkage.evidence import observe
from guardproxy.linkage.redis import RedisLinkageStore
from guardproxy.policy.load import load_policy
from guardproxy.state import open_state
from tests.conftest import sha

T0 = 1_764_460_800.0   # 2025-11-30T00:00:00Z
LINKAGE = """\
linkage:
  secret: test-secret-0123456789
  window: 30d
  threshold: 1.0
  signals:
    - {attribute: payment, weight: 1.0, max_fanout: 5}
    - {attribute: email, weight: 1.0}
    - {ip: exact, weight: 0.5, max_fanout: 20}
    - {ip: /24, weight: 0.3, max_fanout: 20}
    - {header: x-device-id, weight: 0.6, max_fanout: 5}
    - {prompt_similarity: 0.8, weight: 0.25, min_pairs: 5}
    - {co_activity: 60s, weight: 0.25, min_events: 5}
"""
# alice and bob pay with one card; carol shares only a /24 with them (0.3: no link)
ACCOUNTS = {"alice": {"payment": "card-1"}, "bob": {"payment": "card-1"},
            "carol": {"payment": "card-2"}, "dave": {"payment": "card-3"}}


def policy_file(tmp: Path, state: str = "memory://", prefix: str = "guardproxy",
                accounts: dict[str, dict[str, str]] | None = None) -> Path:
    lines = ["accounts:"]
    for account, attributes in (accounts or ACCOUNTS).items():
        lines += [f"  - id: {account}", f"    key_sha256: {sha('key-' + account)}",
                  "    attributes: " + json.dumps(attributes)]
    (tmp / "accounts.yaml").write_text("\n".join(lines) + "\n")
    policy = tmp / "policy.yaml"
    policy.write_text(f"version: 1\nstate: '{state}'\nkey_prefix: {prefix}\n"
                      "accounts: {keys: accounts.yaml}\n" + LINKAGE)
    return policy


def line(when: Any, account: str, ip: str = "198.51.100.7", **extra: Any) -> str:
    return json.dumps({"time": when, "account": account, "ip": ip, **extra})


def ingest(tmp: Path, lines: list[str], *args: str,
           accounts: dict[str, dict[str, str]] | None = None) -> tuple[Any, Path]:
    log = tmp / "log.jsonl"
    log.write_bytes("\n".join(lines).encode() + b"\n")
    policy = policy_file(tmp, accounts=accounts)
    result = CliRunner().invoke(main, ["ingest", "--policy", str(policy), str(log), *args])
    return result, log


# -- times ----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (T0, T0), (int(T0), T0), ("1764460800", T0), ("1764460800.5", T0 + 0.5),
    ("2025-11-30T00:00:00Z", T0), ("2025-11-30t00:00:00z", T0),
    ("2025-11-30 00:00:00Z", T0), ("2025-11-30T02:00:00+02:00", T0),
    ("2025-11-29T19:00:00.250-05:00", T0 + 0.25),
])
def test_times_unix_or_rfc3339(value: Any, expected: float) -> None:
    assert parse_time(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [
    "2025-11-30T00:00:00", "2025-11-30", "yesterday", "", True, None, [], -1, float("nan"),
    "inf", {"t": 1}])
def test_times_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_time(value)


def test_rfc3339_and_unix_records_are_the_same_time(tmp_path: Path) -> None:
    """Half the log in RFC 3339, half in unix seconds: one link whose first and last
    sightings are the records' own times (not the time of the ingest)."""
    lines = [line("2025-11-30T00:00:00Z", "alice"), line(T0 + 60, "bob"),
             line("2025-11-30T01:00:00+01:00", "alice"), line(T0 + 3600, "bob")]
    result, _ = ingest(tmp_path, lines, "--export", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    (cluster,) = json.loads((tmp_path / "out.json").read_text())["clusters"]
    (link,) = cluster["links"]
    card = next(e for e in link["evidence"] if e["signal"] == "attribute:payment")
    assert (card["first_seen"], card["last_seen"]) == (T0 + 60, T0 + 3600)


# -- bad lines --------------------------------------------------------------------
def test_bad_lines_are_reported_with_their_number_and_skipped(tmp_path: Path) -> None:
    lines = [line(T0, "alice"),                                   # 1 good
             "{not json",                                         # 2
             "[1, 2]",                                            # 3
             json.dumps({"account": "bob"}),                      # 4 no time
             line("last tuesday", "bob"),                         # 5
             line(T0, ""),                                        # 6 no account
             line(T0, "bob", ip="300.1.2.3"),                     # 7
             line(T0, "bob", headers={"x-device-id": 7}),         # 8
             line(T0, "bob", prompt=["a"]),                       # 9
             "",                                                  # 10 blank: ignored
             line(T0 + 5, "bob", note="extra keys are fine")]     # 11 good
    log = tmp_path / "log.jsonl"
    log.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n" + line(T0 + 9, "carol")
                    .encode() + b"\n")                            # 12 not UTF-8, 13 good
    result = CliRunner().invoke(main, ["ingest", "--policy", str(policy_file(tmp_path)),
                                       str(log)])
    assert result.exit_code == 0, result.output
    reported = [x for x in result.stderr.splitlines() if x.startswith(f"{log}:")]
    assert [int(x.split(":")[1]) for x in reported] == [2, 3, 4, 5, 6, 7, 8, 9, 12]
    assert "not JSON" in reported[0] and "missing 'time'" in reported[2]
    assert "not UTF-8" in reported[-1]
    assert "13 lines read, 9 skipped, 3 records" in result.stdout
    assert "1 cluster of 2+ accounts" in result.stdout   # alice and bob: one card


def test_a_log_of_bad_lines_only_is_not_fatal(tmp_path: Path) -> None:
    result, log = ingest(tmp_path, ["nope", "{}"], "--export", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    assert f"{log}:1:" in result.stderr and f"{log}:2: missing 'time'" in result.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == {"clusters": [],
                                                               "hot_values": []}


def test_parse_record_keeps_the_format() -> None:
    record = parse_record(json.dumps({
        "time": T0, "account": "a", "ip": "::ffff:203.0.113.9",
        "headers": {"X-Device-Id": "d"}, "prompt": "p" * 10_000}))
    assert record.headers == {"x-device-id": "d"}
    assert record.prompt is not None and len(record.prompt) == 4096   # as the proxy sees
    assert parse_record(line(T0, "a", ip="")).ip == ""


# -- export ----------------------------------------------------------------------------
def test_export_shape_is_the_issues(tmp_path: Path) -> None:
    """{"clusters": [{"id", "accounts", "links": [{"a", "b", "evidence": [...]}]}],
    "hot_values": [...]}; clusters of one account are left out; no raw value."""
    lines = [line(T0 + i, a, ip=f"198.51.100.{i}") for i, a in
             enumerate(["alice", "bob", "carol", "dave"])]
    # card-9 held by six accounts is hot (max_fanout 5): reported, links nobody (they
    # share nothing else: on one network too, it would be co-held, linkage.cohort)
    accounts = {**ACCOUNTS, **{f"x{i}": {"payment": "card-9"} for i in range(6)}}
    lines += [line(T0 + 10 + i, f"x{i}", ip=f"192.0.{i + 10}.1") for i in range(6)]
    result, _ = ingest(tmp_path, lines, "--export", str(tmp_path / "out.json"),
                       accounts=accounts)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out.json").read_text()
    doc = json.loads(text)
    assert set(doc) == {"clusters", "hot_values"}
    (cluster,) = doc["clusters"]
    assert set(cluster) >= {"id", "accounts", "links"}
    assert cluster["id"] == "alice" and cluster["accounts"] == ["alice", "bob"]
    (link,) = cluster["links"]
    assert (link["a"], link["b"]) == ("alice", "bob")
    assert {e["signal"] for e in link["evidence"]} == {"attribute:payment", "ip:/24"}
    assert all(set(e) >= {"signal", "weight", "first_seen", "last_seen"}
               for e in link["evidence"])
    (hot,) = doc["hot_values"]
    assert hot["signal"] == "attribute:payment" and hot["accounts"] == 6
    assert "card-" not in text and "198.51.100" not in text


def test_progress_does_not_break_export(tmp_path: Path) -> None:
    lines = [line(T0 + i, ["alice", "bob", "carol"][i % 3], prompt="hello " * 20)
             for i in range(300)] + ["oops"]
    plain, _ = ingest(tmp_path, lines, "--export", str(tmp_path / "a.json"), "--no-progress")
    shown, log = ingest(tmp_path, lines, "--export", str(tmp_path / "b.json"), "--progress")
    assert plain.exit_code == shown.exit_code == 0, shown.output
    assert json.loads((tmp_path / "a.json").read_text()) == \
        json.loads((tmp_path / "b.json").read_text())
    assert json.loads((tmp_path / "b.json").read_text())["clusters"]
    assert plain.stdout == shown.stdout                    # the summary: stdout only
    assert f"{log}:301:" in shown.stderr                   # bad lines still reported


def test_ingest_without_linkage_says_so(tmp_path: Path) -> None:
    policy = policy_file(tmp_path)
    policy.write_text(policy.read_text().split("linkage:")[0])
    log = tmp_path / "log.jsonl"
    log.write_text(line(T0, "alice") + "\n")
    result = CliRunner().invoke(main, ["ingest", "--policy", str(policy), str(log)])
    assert result.exit_code == 1 and "no 'linkage:' section" in result.stderr


# -- a tiny world --------------------------------------------------------------------
def test_tiny_world_finds_the_naive_hydra(tmp_path: Path) -> None:
    """bench/hydra's world at 300 accounts with one naive hydra of 5 (one card, one IP):
    replayed through ingest, the hydra is one cluster and nothing else is linked to it."""
    from bench.hydra import pair_counts, replay, write_inputs
    from bench.hydra_world import World, build

    world = World(accounts=300, seed=3, days=1, hydras=1, hydra_size=(5, 5))
    pop = build(world)
    policy, log = write_inputs(pop, tmp_path)
    run = replay(pop, policy, log)
    hydra = sorted(m.id for m in pop.members if m.level == "naive")
    assert len(hydra) == 5
    assert any(list(accounts) == hydra for _, accounts, _ in run.graph.clusters)
    counts = pair_counts(pop, run.graph)
    assert counts["naive"]["found"] == counts["naive"]["true"] == 10
    assert counts["naive"]["false"] == 0
    # per-cluster budgets: the hydra's day is one budget (plus what it took before the
    # card linked it), where per-account budgets gave it five
    name = pop.by_id()[hydra[0]].actor
    assert run.take[(name, "account", 0)] > 4 * world.budget
    assert run.take[(name, "cluster", 0)] <= 1.5 * world.budget


# -- formats and the linkage command ------------------------------------------------------
GRAPH = Graph(clusters=(("a&1", ("a&1", 'b"2'), (Link("a&1", 'b"2', (
    LinkEvidence("attribute:payment", 1.0, T0, T0 + 1),)),)),))


def test_graphml_and_dot_escape_account_ids() -> None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(graphml(GRAPH))
    ns = "{http://graphml.graphdrawing.org/xmlns}"
    assert [n.get("id") for n in root.iter(f"{ns}node")] == ["a&1", 'b"2']
    (edge,) = root.iter(f"{ns}edge")
    assert (edge.get("source"), edge.get("target")) == ("a&1", 'b"2')
    text = dot(GRAPH)
    assert '"a&1" -- "b\\"2"' in text and text.startswith("graph linkage {")


def test_linkage_cli_on_memory_says_so_in_one_line(tmp_path: Path) -> None:
    policy = policy_file(tmp_path)
    for args in (["show", "alice"], ["export"], ["block", "alice"], ["unblock", "alice"]):
        result = CliRunner().invoke(main, ["linkage", *args, "--policy", str(policy)])
        assert result.exit_code == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert "memory://" in result.stderr and "ingest --export" in result.stderr


def test_linkage_cli_reads_and_writes_the_redis_store(
        tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    policy_path = policy_file(tmp_path, state=url, prefix=prefix)
    policy = load_policy(policy_path)
    settings = policy.linkage
    assert settings is not None
    accounts = {a.id: a for a in policy.keys.values()}

    async def seed() -> None:
        state = open_state(policy.state, policy.key_prefix)
        assert state.redis is not None
        store = RedisLinkageStore(state.redis, state.key_prefix, settings)
        for i, account in enumerate(["alice", "bob", "carol"]):
            await store.record(account, observe(settings, accounts[account],
                                                f"198.51.100.{i}", {}), T0 + i)
        await state.aclose()

    asyncio.run(seed())
    run = CliRunner().invoke
    shown = run(main, ["linkage", "show", "bob", "--policy", str(policy_path), "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert (doc["cluster"], doc["accounts"]) == ("alice", ["alice", "bob"])
    assert {e["signal"] for e in doc["links"][0]["evidence"]} == {"attribute:payment",
                                                                 "ip:/24"}
    alone = run(main, ["linkage", "show", "carol", "--policy", str(policy_path)])
    assert "not linked" in alone.stdout
    assert run(main, ["linkage", "block", "alice", "--policy", str(policy_path)]).exit_code == 0
    text = run(main, ["linkage", "show", "bob", "--policy", str(policy_path)]).stdout
    assert "linked to a blocked account" in text and "card-1" not in text
    run(main, ["linkage", "unblock", "alice", "--policy", str(policy_path)])
    text = run(main, ["linkage", "show", "bob", "--policy", str(policy_path)]).stdout
    assert "blocked" not in text
    for fmt in ("json", "graphml", "dot"):
        out = tmp_path / f"graph.{fmt}"
        result = run(main, ["linkage", "export", "--format", fmt, "-o", str(out),
                            "--policy", str(policy_path)])
        assert result.exit_code == 0, result.output
        assert "bob" in out.read_text()
    exported = json.loads((tmp_path / "graph.json").read_text())
    assert [c["accounts"] for c in exported["clusters"]] == [["alice", "bob"]]


def test_ingest_into_the_redis_store_is_what_linkage_show_reads(
        tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    policy = policy_file(tmp_path, state=url, prefix=prefix)
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([line(T0, "alice"), line("2025-11-30T00:01:00Z", "bob"),
                              line(T0 + 120, "carol", ip="203.0.113.5")]) + "\n")
    run = CliRunner().invoke
    private = run(main, ["ingest", "--policy", str(policy), str(log)])
    assert private.exit_code == 0, private.output
    before = run(main, ["linkage", "show", "bob", "--policy", str(policy), "--json"])
    assert json.loads(before.stdout)["accounts"] == ["bob"]      # without --store: nothing
    shared = run(main, ["ingest", "--store", "--policy", str(policy), str(log),
                        "--export", str(tmp_path / "out.json")])
    assert shared.exit_code == 0, shared.output
    after = json.loads(run(main, ["linkage", "show", "bob", "--policy", str(policy),
                                  "--json"]).stdout)
    assert after["accounts"] == ["alice", "bob"]
    card = next(e for e in after["links"][0]["evidence"] if e["signal"] == "attribute:payment")
    assert (card["first_seen"], card["last_seen"]) == (T0 + 60, T0 + 60)   # log time
    first = json.loads((tmp_path / "out.json").read_text())
    assert first["clusters"][0]["accounts"] == ["alice", "bob"]
    again = run(main, ["ingest", "--store", "--policy", str(policy), str(log),
                       "--export", str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again.json").read_text()) == first   # idempotent


def test_ingest_store_on_memory_says_so(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(line(T0, "alice") + "\n")
    result = CliRunner().invoke(main, ["ingest", "--store", "--policy",
                                       str(policy_file(tmp_path)), str(log)])
    assert result.exit_code == 1 and "memory://" in result.stderr


# -- robustness: times, addresses, account ids, summary, export -------------------------
def test_times_outside_a_sane_range_are_refused() -> None:
    now = T0 + 86400 * 365
    assert parse_time(EARLIEST, now) == EARLIEST
    assert parse_time(now + MAX_AHEAD, now) == now + MAX_AHEAD
    assert parse_time("2025-11-30T00:00:00Z", now) == T0
    for value in (EARLIEST - 1, "1999-12-31T23:59:59Z", now + MAX_AHEAD + 1, 1e308,
                  "9999-12-31T23:59:59Z", 0):
        with pytest.raises(ValueError, match="outside 2000-01-01"):
            parse_time(value, now)


def test_a_far_future_or_ancient_record_is_a_bad_line(tmp_path: Path) -> None:
    lines = [line(T0, "alice"), line(1e308, "carol", ip="192.0.2.1"),
             line(T0 + 60, "bob"), line(0, "dave"), line("2999-01-01T00:00:00Z", "dave")]
    result, log = ingest(tmp_path, lines, "--export", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    reported = [x for x in result.stderr.splitlines() if x.startswith(f"{log}:")]
    assert [int(x.split(":")[1]) for x in reported] == [2, 4, 5]
    assert all("outside 2000-01-01" in x for x in reported)
    assert "5 lines read, 3 skipped, 2 records" in result.stdout
    clusters = json.loads((tmp_path / "out.json").read_text())["clusters"]
    assert [c["accounts"] for c in clusters] == [["alice", "bob"]]   # not expired


@pytest.mark.parametrize(("written", "address"), [
    ("203.0.113.9:443", "203.0.113.9"), ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"), (" 203.0.113.9 ", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"), ("2001:DB8::1", "2001:db8::1"),
])
def test_client_ips_are_read_as_the_proxy_reads_them(written: str, address: str) -> None:
    assert parse_record(line(T0, "a", ip=written)).ip == address


@pytest.mark.parametrize("written", ["203.0.113.9:http", "[2001:db8::1", "2001:db8::1]:443",
                                     "[203.0.113.9]:x", "host.example:443"])
def test_malformed_client_ips_are_refused(written: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        parse_record(line(T0, "a", ip=written))


def test_account_ids_are_trimmed(tmp_path: Path) -> None:
    assert parse_record(line(T0, "  bob\t")).account == "bob"
    with pytest.raises(ValueError, match="non-empty"):
        parse_record(line(T0, " \t "))
    result, _ = ingest(tmp_path, [line(T0, "alice"), line(T0 + 1, " bob ")],
                       "--export", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    assert "2 accounts;" in result.stdout and "not in the accounts file" not in result.stdout
    clusters = json.loads((tmp_path / "out.json").read_text())["clusters"]
    assert [c["accounts"] for c in clusters] == [["alice", "bob"]]   # bob's card counted


def test_the_summary_counts_in_the_singular_and_plural(tmp_path: Path) -> None:
    one, _ = ingest(tmp_path, [line(T0 + 10, "alice"), line(T0, "bob")])
    assert "1 record was older than one before it:" in one.stdout
    two, _ = ingest(tmp_path, [line(T0 + 10, "alice"), line(T0, "bob"), line(T0 - 1, "carol")])
    assert "2 records were older than one before it:" in two.stdout


def test_export_weights_are_rounded() -> None:
    graph = Graph(clusters=(("a", ("a", "b"), (Link("a", "b", (
        LinkEvidence("header:x", 0.1, T0, T0), LinkEvidence("ip:/24", 0.2, T0, T0),
        LinkEvidence("ip:exact", 1 / 3, T0, T0))),)),))
    (link,) = graph.as_json()["clusters"][0]["links"]
    assert link["weight"] == round(0.1 + 0.2 + 1 / 3, 6) == 0.633333
    assert [e["weight"] for e in link["evidence"]] == [0.1, 0.2, 0.333333]
    assert "0000000" not in json.dumps(graph.as_json())
