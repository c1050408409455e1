"""``guardproxy audit verify FILE...``: check a chained audit trail across rotations."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def audit() -> None:
    """Work with the audit trail (the policy's 'audit:' section)."""


@audit.command("verify")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--as-given", is_flag=True,
              help="Check the files in the order given instead of putting the rotations "
              "of one trail oldest first.")
def verify_command(files: tuple[Path, ...], as_given: bool) -> None:
    """Check the hash chain of an audit trail written with 'chain: true'.

    FILES are the trail and its rotations in any order (audit.jsonl*): those of one
    trail are checked oldest first (audit.jsonl.3, .2, .1, audit.jsonl), across file
    boundaries. Prints FILE:LINE: reason for each break and exits 1; else one OK line
    with the counts and the last line's hash (keep it elsewhere: lines cut from the end
    leave no trace in the chain)."""
    from guardproxy.audit.verify import trails, verify_chain

    names = [str(f) for f in files]
    # each trail (a file and its rotations: one per worker with {pid}) is its own chain
    groups = [names] if as_given else trails(names)
    try:
        reports = [verify_chain(group) for group in groups]
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    failed = False
    for report in reports:
        for problem in report.breaks:
            click.echo(problem.text())
        if report.breaks:
            failed = True
            n = len(report.breaks)
            click.echo(f"FAILED: {n} break{'' if n == 1 else 's'} in {report.lines:,} lines "
                       f"of {report.files} file{'' if report.files == 1 else 's'}", err=True)
    if failed:
        sys.exit(1)
    for group, report in zip(groups, reports, strict=True):
        click.echo(report.text() if len(groups) == 1 else f"{group[-1]}: {report.text()}")
