"""``guardproxy linkage show|export|block|unblock``: the linkage graph in the policy's store.

With a Redis state the graph is the one every replica shares; a ``memory://`` graph
lives inside the proxy process (ask it: ``/admin/linkage/{account}``) or is the
``--export`` of ``guardproxy ingest``. Nothing shown here is a raw value: evidence is
named by its signal, weight and first/last time seen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from xml.sax.saxutils import escape, quoteattr

import click

from guardproxy.linkage.api import Cluster, Graph, Link, LinkageStore

T = TypeVar("T")
FORMATS = ("json", "graphml", "dot")
_POLICY = click.option("--policy", "policy_path", type=click.Path(path_type=Path),
                       required=True, envvar="GUARDPROXY_POLICY")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _run(policy_path: Path, action: Callable[[LinkageStore], Awaitable[T]]) -> T:
    """``action`` on the policy's linkage store, or exit with the one-line reason why
    there is none to read here."""
    from guardproxy.cli.serve import _load_or_exit
    from guardproxy.errors import StoreError
    from guardproxy.linkage.enricher import open_linkage_store
    from guardproxy.state import open_state, scheme_of

    policy = _load_or_exit(policy_path)
    settings = policy.linkage
    if settings is None:
        click.echo(f"{policy_path}: the policy has no 'linkage:' section", err=True)
        sys.exit(1)
    if scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory://, so the linkage graph lives inside "
                   "the proxy process: ask it (/admin/linkage/...) or use "
                   "'guardproxy ingest --export'", err=True)
        sys.exit(1)

    async def run() -> T:
        state = open_state(policy.state, policy.key_prefix)
        store = open_linkage_store(settings, state)
        try:
            return await action(store)
        finally:
            await store.aclose()
            await state.aclose()

    try:
        return asyncio.run(run())
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def linkage() -> None:
    """Inspect and act on account linkage (clusters of accounts that act as one)."""


@linkage.command("show")
@click.argument("account")
@_POLICY
@click.option("--json", "as_json", is_flag=True)
def show_command(account: str, policy_path: Path, as_json: bool) -> None:
    """ACCOUNT's cluster: its members and the evidence behind every link."""

    async def read(store: LinkageStore) -> tuple[Cluster, list[str], list[Link], list[str]]:
        return (await store.cluster(account), await store.members(account),
                await store.links(account), await store.blocked())

    cluster, members, links, blocked = _run(policy_path, read)
    cid, size = cluster.id, cluster.size
    if as_json:
        click.echo(json.dumps({"account": account, "cluster": cid, "accounts": members,
                               "blocked": sorted(set(members) & set(blocked)),
                               "links": _links_json(links)}, indent=2))
        return
    click.echo(f"account {account}: cluster {cid} ({size} account{'s' * (size != 1)})"
               + ("; blocked" if account in blocked else "")
               + ("; linked to a blocked account" if cluster.linked_to_blocked else ""))
    if size <= 1:
        click.echo("  not linked to any other account")
        return
    others = sorted(set(members) & set(blocked) - {account})
    click.echo("  members: " + ", ".join(members))
    if others:
        click.echo("  blocked members: " + ", ".join(others))
    for link in links:
        click.echo(f"  {link.a} -- {link.b}  weight {link.weight:.2f}")
        for e in link.evidence:
            click.echo(f"      {e.signal:<24} {e.weight:.2f}  first {_when(e.first_seen)}  "
                       f"last {_when(e.last_seen)}")


@linkage.command("export")
@_POLICY
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="json",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write here instead of stdout.")
def export_command(policy_path: Path, fmt: str, output: Path | None) -> None:
    """Write the linkage graph (clusters of two or more accounts, their links and the
    hot values) as JSON, GraphML or Graphviz DOT."""

    async def read(store: LinkageStore) -> Graph:
        return await store.graph()

    text = render(_run(policy_path, read), fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def _block(account: str, policy_path: Path, blocked: bool) -> None:
    async def act(store: LinkageStore) -> None:
        await store.block(account, blocked)

    _run(policy_path, act)
    click.echo(f"{account}: {'blocked' if blocked else 'unblocked'}")


@linkage.command("block")
@click.argument("account")
@_POLICY
def block_command(account: str, policy_path: Path) -> None:
    """Put ACCOUNT on the blocklist (rules 'linkage: {linked_to: blocked}' deny every
    account linked to it)."""
    _block(account, policy_path, True)


@linkage.command("unblock")
@click.argument("account")
@_POLICY
def unblock_command(account: str, policy_path: Path) -> None:
    """Take ACCOUNT off the blocklist."""
    _block(account, policy_path, False)


# -- formats ----------------------------------------------------------------
def _links_json(links: list[Link]) -> list[dict[str, object]]:
    return [{"a": link.a, "b": link.b, "weight": link.weight,
             "evidence": [{"signal": e.signal, "weight": e.weight, "first_seen": e.first_seen,
                           "last_seen": e.last_seen} for e in link.evidence]}
            for link in links]


def render(graph: Graph, fmt: str) -> str:
    """``graph`` as ``json`` (``Graph.as_json``), ``graphml`` or ``dot``. GraphML and
    DOT carry the clusters and links; the hot values are in the JSON only."""
    if fmt == "json":
        return json.dumps(graph.as_json(), indent=1) + "\n"
    if fmt == "graphml":
        return graphml(graph)
    if fmt == "dot":
        return dot(graph)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def _signals(link: Link) -> str:
    return ",".join(e.signal for e in link.evidence)


def graphml(graph: Graph) -> str:
    """GraphML (http://graphml.graphdrawing.org/): a node per account (``cluster``),
    an undirected edge per link (``weight``, ``signals``)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
           '  <key id="cluster" for="node" attr.name="cluster" attr.type="string"/>',
           '  <key id="weight" for="edge" attr.name="weight" attr.type="double"/>',
           '  <key id="signals" for="edge" attr.name="signals" attr.type="string"/>',
           '  <graph id="linkage" edgedefault="undirected">']
    for cid, accounts, links in graph.clusters:
        for account in accounts:
            out.append(f"    <node id={quoteattr(account)}><data key=\"cluster\">"
                       f"{escape(cid)}</data></node>")
        for link in links:
            out.append(f"    <edge source={quoteattr(link.a)} target={quoteattr(link.b)}>"
                       f"<data key=\"weight\">{link.weight:g}</data>"
                       f"<data key=\"signals\">{escape(_signals(link))}</data></edge>")
    out += ["  </graph>", "</graphml>"]
    return "\n".join(out) + "\n"


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot(graph: Graph) -> str:
    """Graphviz DOT: a ``cluster_`` subgraph per cluster, an edge per link labelled
    with its signals and weight."""
    out = ["graph linkage {", "  node [shape=box];"]
    for i, (cid, accounts, links) in enumerate(graph.clusters):
        out.append(f"  subgraph cluster_{i} {{")
        out.append(f"    label={_dot_id(cid)};")
        out += [f"    {_dot_id(account)};" for account in accounts]
        out += [f"    {_dot_id(link.a)} -- {_dot_id(link.b)} "
                f"[label={_dot_id(f'{_signals(link)} ({link.weight:g})')}, "
                f"weight={link.weight:g}];" for link in links]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
