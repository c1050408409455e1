"""``guardproxy serve``, ``check`` and ``fake-model``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import click

from guardproxy.errors import PolicyError
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy

T = TypeVar("T")


def _load_or_exit(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)


def _part_or_exit(path: Path, part: Callable[[Policy], T]) -> tuple[Policy, T]:
    """The policy and one part of it (its canary settings, its ledger…), or exit with
    the one-line reason the policy lacks that part."""
    policy = _load_or_exit(path)
    try:
        return policy, part(policy)
    except ValueError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


@click.command()
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY", help="Policy YAML file.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.option("--upstream", default=None, metavar="URL",
              help="Override upstream.url of the policy.")
@click.option("--demo", is_flag=True,
              help="Also start the built-in fake model API and forward to it.")
def serve(policy_path: Path, host: str, port: int, workers: int, log_level: str,
          access_log: bool, upstream: str | None, demo: bool) -> None:
    """Run the proxy in front of the upstream named in the policy."""
    import uvicorn

    from guardproxy.app import POLICY_ENV, UPSTREAM_ENV
    from guardproxy.state import scheme_of

    policy = _load_or_exit(policy_path)
    if demo:
        from guardproxy.cli.demo import start_fake_model_thread

        upstream = start_fake_model_thread()
        click.echo(f"demo: fake model API on {upstream}", err=True)
    if upstream:
        os.environ[UPSTREAM_ENV] = upstream
        policy = replace(policy, upstream=replace(policy.upstream, url=upstream))
    if workers > 1 and scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory:// but --workers {workers}: each worker "
                   "would count alone. Use a redis:// state or --workers 1.", err=True)
        sys.exit(2)
    os.environ[POLICY_ENV] = str(policy_path.resolve())
    click.echo(f"guardproxy on http://{host}:{port} -> {policy.upstream.url} "
               f"({policy.upstream.dialect}, {len(policy.rules)} rules, state {policy.state})",
               err=True)
    # proxy_headers=False: uvicorn would otherwise take the client address from
    # X-Forwarded-For whenever the peer is 127.0.0.1, behind clients.trusted_proxies' back
    uvicorn.run("guardproxy.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level, access_log=access_log,
                server_header=False, date_header=False, proxy_headers=False)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def check(files: tuple[Path, ...]) -> None:
    """Validate policy files: one line per problem, FILE:LINE: field: message."""
    failed = False
    for path in files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed = True
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            continue
        click.echo(f"{path}: ok ({len(policy.rules)} rules, {len(policy.keys)} keys)")
    sys.exit(1 if failed else 0)


@click.command("fake-model")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--chunk-delay", default=0.0, show_default=True, type=float,
              help="Seconds between streamed chunks.")
def fake_model(host: str, port: int, chunk_delay: float) -> None:
    """Run a built-in fake OpenAI/Anthropic model API (for demos and tests)."""
    from guardproxy.fake_model import run_fake_model

    run_fake_model(host=host, port=port, chunk_delay=chunk_delay)
