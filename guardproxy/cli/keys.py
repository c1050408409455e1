"""``guardproxy keys``: issue API keys; only their SHA-256 is stored."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from guardproxy.identity.keys import add_key


@click.group()
def keys() -> None:
    """Manage API keys in an accounts file."""


@keys.command("add")
@click.argument("account")
@click.option("--org", default=None, help="Organisation (default: the account id).")
@click.option("--tier", default=None, help="Tier used by 'when: {tier: …}' (default: default).")
@click.option("--file", "path", type=click.Path(path_type=Path),
              default=Path("policies/accounts.yaml"), show_default=True)
def add(account: str, org: str | None, tier: str | None, path: Path) -> None:
    """Generate a key for ACCOUNT, store its hash, print the key once."""
    try:
        key = add_key(path, account, org, tier)
    except (OSError, ValueError) as exc:
        click.echo(f"{path}: {exc}", err=True)
        sys.exit(1)
    click.echo(key)
    click.echo(f"stored the SHA-256 of this key for account {account!r} in {path}; "
               "the key itself is not kept anywhere: copy it now.", err=True)
