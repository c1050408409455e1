"""``guardproxy ledger match``: which responses does a leaked text come from?"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import click

from guardproxy.cli.serve import _part_or_exit


@click.group()
def ledger() -> None:
    """Look leaked text up in the output ledger."""


@ledger.command("match")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="Matches reported per file, most significant first.")
@click.option("--common", default=1000, show_default=True, type=click.IntRange(1),
              help="Ignore fingerprints held by more responses than this (common phrases).")
@click.option("--max-distance", default=None, type=click.IntRange(0, 64), hidden=True,
              help="Deprecated (SimHash ledgers): accepted and ignored.")
@click.option("--json", "as_json", is_flag=True)
def match_command(files: tuple[Path, ...], policy_path: Path, limit: int, common: int,
                  max_distance: int | None, as_json: bool) -> None:
    """Recorded responses each FILE shares text with: any copied run of >= 50 words,
    or copied sentence of >= 8 words, whatever the line breaks, case or markdown.
    Each match gives the account, request id, time, the fingerprints shared, the words
    of FILE they span, an excerpt and the log10 p-value of a chance match (also
    corrected for the ledger's size)."""
    from guardproxy.canary.ledger import Match, MemoryLedger, match
    from guardproxy.canary.settings import ledger_from_policy
    from guardproxy.errors import StoreError

    if max_distance is not None:
        click.echo("--max-distance is deprecated and ignored: the ledger now matches "
                   "fingerprints, not SimHash distances", err=True)
    _, store = _part_or_exit(policy_path, ledger_from_policy)
    if isinstance(store, MemoryLedger):
        click.echo(f"{policy_path}: a memory:// ledger lives inside the proxy process and is "
                   "empty here (use POST /admin/ledger/match)", err=True)

    async def run() -> list[tuple[Path, Match]]:
        rows: list[tuple[Path, Match]] = []
        try:
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                rows += [(path, m) for m in await match(store, text, common=common,
                                                        limit=limit)]
        finally:
            await store.aclose()
        return rows

    try:
        rows = asyncio.run(run())
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([{"file": str(path), **m.as_dict()} for path, m in rows],
                              indent=2))
        return
    for path, m in rows:
        when = datetime.fromtimestamp(m.entry.time, UTC).isoformat()
        start, end = m.leak_span
        click.echo(f"{path} words {start}-{end}: account={m.entry.account} "
                   f"request={m.entry.request_id} time={when} shared={m.shared} "
                   f"log10_p={m.log10_p:.1f} (ledger-wide {m.log10_p_ledger:.1f})\n"
                   f"    {m.excerpt}")
    if not rows:
        click.echo("no match")
