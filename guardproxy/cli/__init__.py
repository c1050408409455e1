"""The ``guardproxy`` command (click: subcommands, typed options and help for free)."""

from __future__ import annotations

import click

from guardproxy.cli.audit import audit
from guardproxy.cli.canary import canary
from guardproxy.cli.explain import explain
from guardproxy.cli.ingest import ingest_command
from guardproxy.cli.keys import keys
from guardproxy.cli.ledger import ledger
from guardproxy.cli.linkage import linkage
from guardproxy.cli.serve import check, fake_model, serve
from guardproxy.cli.usage import usage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guardproxy")
def main() -> None:
    """guardproxy: an anti-distillation policy proxy for model APIs."""


main.add_command(serve)
main.add_command(check)
main.add_command(fake_model)
main.add_command(keys)
main.add_command(usage)
main.add_command(canary)
main.add_command(ledger)
main.add_command(ingest_command)
main.add_command(linkage)
main.add_command(audit)
main.add_command(explain)
