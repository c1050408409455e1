"""``guardproxy usage ACCOUNT --policy FILE``: budget usage straight from the state store."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from guardproxy.cli.serve import _load_or_exit


@click.command()
@click.argument("account")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage(account: str, policy_path: Path, as_json: bool) -> None:
    """Show each token budget's used / reserved / remaining / reset for ACCOUNT."""
    from guardproxy.admin import usage_report
    from guardproxy.flow import Pipeline
    from guardproxy.state import open_state, scheme_of

    policy = _load_or_exit(policy_path)
    if scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory://, which lives inside the proxy process; "
                   "ask the running proxy: GET /admin/usage/{account}", err=True)

    async def fetch() -> dict[str, Any] | None:
        state = open_state(policy.state, policy.key_prefix)
        try:
            return await usage_report(Pipeline(policy, state), account)
        finally:
            await state.aclose()

    report = asyncio.run(fetch())
    if report is None:
        click.echo(f"{policy_path}: unknown account {account!r}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"account {report['account']} (org {report['org']}, tier {report['tier']})")
    for budget in report["budgets"]:
        if "windows" not in budget:
            click.echo(f"  {budget['rule']}: {budget['note']}")
            continue
        for w in budget["windows"]:
            click.echo(f"  {budget['rule']:<20} {w['limit']:>12}/{w['seconds']}s  "
                       f"used {w['used']:>10}  reserved {w['reserved']:>8}  "
                       f"remaining {w['remaining']:>10}  reset {w['reset_at']:.0f}")
