"""``guardproxy canary detect`` and ``canary probe``: whose outputs are these?"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from guardproxy.cli.serve import _part_or_exit


def _setup(policy_path: Path) -> tuple[Any, list[str]]:
    from guardproxy.canary.keys import CanaryKeys
    from guardproxy.canary.settings import canary_settings, known_accounts

    policy, settings = _part_or_exit(policy_path, canary_settings)
    return CanaryKeys(settings.secret, settings.rate), known_accounts(policy)


def _report(verdict: Any, as_json: bool) -> None:
    from guardproxy.canary.stats import format_p

    g = verdict.global_score
    marked = verdict.marked
    if as_json:
        click.echo(json.dumps(verdict.as_dict(), indent=2))
        return
    click.echo(f"words {verdict.words}; global sites {g.sites}, keyed choice kept at "
               f"{g.hits} ({g.hits / g.sites:.0%})" if g.sites else
               f"words {verdict.words}; no global sites found")
    click.echo(f"global key: p = {format_p(g.log10_p)} (exact one-sided binomial), "
               f"z = {g.z:.1f}")
    if verdict.null_keys:
        click.echo(f"empirical null: {verdict.null_exceed:.1%} of {verdict.null_keys} random "
                   f"keys score z >= {g.z:.1f} (their max z {verdict.null_max_z:.1f})")
    click.echo("verdict: " + ("MARKED — this text came from this deployment" if marked
                              else "not shown to be ours (p >= 1e-6)"))
    if not verdict.accounts:
        click.echo("accounts: no known account decoded")
    for a in verdict.accounts:
        click.echo(f"  account {a.account}: {a.hits}/{a.positions} codeword positions agree, "
                   f"p = {format_p(a.log10_p)}, Bonferroni over "
                   f"{a.known_accounts} accounts: {format_p(a.log10_p_bonferroni)}")
    if verdict.mixed:
        names = ", ".join(a.account for a in verdict.accounts
                          if a.log10_p_bonferroni < -6)
        click.echo(f"MIXED: outputs of several accounts: {names}")


@click.group()
def canary() -> None:
    """Forensics on marked outputs."""


@canary.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--null-keys", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True)
def detect(files: tuple[Path, ...], policy_path: Path, null_keys: int, as_json: bool) -> None:
    """Score leaked text: the global verdict and the accounts that received it."""
    from guardproxy.canary.detect import detect as run_detect

    keys, accounts = _setup(policy_path)
    texts = []
    with click.progressbar(files, label="reading", file=sys.stderr,
                           hidden=len(files) < 20) as bar:
        for path in bar:
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError as exc:
                click.echo(f"{path}: {exc.strerror or exc}", err=True)
                sys.exit(1)
    _report(run_detect(keys, texts, accounts, null_keys=null_keys), as_json)


def _ask(client: Any, target: str, dialect: str, model: str, prompt: str) -> str:
    if dialect == "anthropic":
        r = client.post(target.rstrip("/") + "/v1/messages", json={
            "model": model, "max_tokens": 512, "messages": [{"role": "user", "content": prompt}]})
        r.raise_for_status()
        return "".join(b.get("text", "") for b in r.json().get("content", []))
    r = client.post(target.rstrip("/") + "/v1/chat/completions", json={
        "model": model, "max_tokens": 512, "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"] or "")


@canary.command()
@click.option("--target", required=True, help="Base URL of the suspect model API.")
@click.option("--dialect", type=click.Choice(["openai", "anthropic"]), default="openai")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True,
              help="One prompt per line.")
@click.option("--model", default="default", show_default=True)
@click.option("--api-key", envvar="PROBE_API_KEY", default="", help="Or $PROBE_API_KEY.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--null-keys", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True)
def probe(target: str, dialect: str, prompts: Path, model: str, api_key: str,
          policy_path: Path, null_keys: int, as_json: bool) -> None:
    """Query a suspect model with prompts and score its answers (a distilled student?)."""
    import httpx

    from guardproxy.canary.detect import detect as run_detect

    keys, accounts = _setup(policy_path)
    lines = [p.strip() for p in prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    headers = {"anthropic-version": "2023-06-01"} if dialect == "anthropic" else {}
    if api_key:  # an empty "Bearer " is not even a legal header value
        headers["x-api-key" if dialect == "anthropic" else "authorization"] = (
            api_key if dialect == "anthropic" else f"Bearer {api_key}")
    answers = []
    with httpx.Client(headers=headers, timeout=120) as client, \
            click.progressbar(lines, label="probing", file=sys.stderr) as bar:
        for prompt in bar:
            try:
                answers.append(_ask(client, target, dialect, model, prompt))
            except httpx.HTTPError as exc:
                click.echo(f"{target}: {exc}", err=True)
                sys.exit(1)
            except (ValueError, LookupError, TypeError, AttributeError) as exc:
                click.echo(f"{target}: not a {dialect} answer ({type(exc).__name__}: {exc})",
                           err=True)
                sys.exit(1)
    verdict = run_detect(keys, answers, accounts, null_keys=null_keys)
    if math.isnan(verdict.null_exceed) and not as_json:
        click.echo("(no empirical null computed)")
    _report(verdict, as_json)
