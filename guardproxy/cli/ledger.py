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
@click.option("--max-distance", default=6, show_default=True, type=click.IntRange(0, 64))
@click.option("--json", "as_json", is_flag=True)
def match_command(files: tuple[Path, ...], policy_path: Path, max_distance: int,
                  as_json: bool) -> None:
    """Pieces of FILE (paragraphs, long lines) within --max-distance SimHash bits of a
    recorded response or of one of its paragraphs."""
    from guardproxy.canary.ledger import MemoryLedger, match
    from guardproxy.canary.settings import ledger_from_policy

    _, store = _part_or_exit(policy_path, ledger_from_policy)
    if isinstance(store, MemoryLedger):
        click.echo(f"{policy_path}: a memory:// ledger lives inside the proxy process and is "
                   "empty here", err=True)

    async def run() -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        try:
            for path in files:
                for m in await match(store, path.read_text(encoding="utf-8"), max_distance):
                    rows.append({"file": str(path), **m.as_dict()})
        finally:
            await store.aclose()
        return rows

    rows = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        when = datetime.fromtimestamp(float(row["time"]), UTC).isoformat()  # type: ignore[arg-type]
        click.echo(f"{row['file']} piece {row['piece']} ({row['excerpt']}): "
                   f"account={row['account']} request={row['request']} "
                   f"distance={row['distance']} time={when}")
    if not rows:
        click.echo("no match")
