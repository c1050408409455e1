"""``guardproxy canary detect``, ``canary probe`` and ``canary index build``: whose
outputs are these?"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from guardproxy.cli.serve import _part_or_exit


def _setup(policy_path: Path) -> tuple[Any, list[str]]:
    from guardproxy.canary.keys import CanaryKeys
    from guardproxy.canary.settings import canary_settings, known_accounts

    policy, settings = _part_or_exit(policy_path, canary_settings)
    keys = CanaryKeys(settings.secret, settings.rate, settings.marks, settings.tripwire)
    return keys, known_accounts(policy)


def _index(keys: Any, accounts: list[str], index_path: Path | None,
           population: int | None) -> Any:
    """The accounts to score: the index file, else the policy's accounts in memory;
    exits with one line for an unusable index or a population below its count."""
    from guardproxy.canary.index import AccountIndex, IndexFileError, accounts_digest
    from guardproxy.canary.settings import population_of

    if index_path is None:
        index = AccountIndex(keys, accounts)
    else:
        try:
            index = AccountIndex.open(index_path, keys)
        except IndexFileError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
        if index.digest != accounts_digest(accounts):
            click.echo(f"warning: {index_path} was built from another list of the policy's "
                       "accounts; rebuild it to score them all", err=True)
    try:
        population_of(index.count, population)
    except ValueError as exc:
        click.echo(f"--population: {exc}", err=True)
        sys.exit(1)
    return index


def _files(score: Any, names: list[str]) -> str:
    shown = [names[i] for i in score.documents[:3]]
    more = len(score.documents) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _report(verdict: Any, as_json: bool, names: list[str] | None = None) -> None:
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
        where = "" if a.documents is None or names is None else f" (in {_files(a, names)})"
        views = f" x {a.views} (views)" if a.views > 1 else ""
        click.echo(f"  account {a.account}: {a.hits}/{a.positions} codeword positions agree"
                   f"{where}, p = {format_p(a.log10_p)}, Bonferroni over "
                   f"{a.population} accounts{views}: {format_p(a.log10_p_bonferroni)}")
    if verdict.mixed:
        named = ", ".join(a.account for a in verdict.accounts
                          if a.log10_p_bonferroni < -6)
        click.echo(f"MIXED: outputs of several accounts: {named}")


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
@click.option("--index", "index_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Account index from 'canary index build' (default: the policy's accounts).")
@click.option("--population", default=None, type=click.IntRange(min=1),
              help="Accounts that could have received the text, for the Bonferroni count "
                   "(default: the known accounts; not fewer).")
def detect(files: tuple[Path, ...], policy_path: Path, null_keys: int, as_json: bool,
           index_path: Path | None, population: int | None) -> None:
    """Score leaked text: the global verdict and the accounts that received it."""
    from guardproxy.canary.detect import detect as run_detect

    keys, accounts = _setup(policy_path)
    index = _index(keys, accounts, index_path, population)
    texts = []
    with click.progressbar(files, label="reading", file=sys.stderr,
                           hidden=len(files) < 20) as bar:
        for path in bar:
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError as exc:
                click.echo(f"{path}: {exc.strerror or exc}", err=True)
                sys.exit(1)
    verdict = run_detect(keys, texts, index, null_keys=null_keys, population=population)
    _report(verdict, as_json, [str(path) for path in files])


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
@click.option("--index", "index_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Account index from 'canary index build' (default: the policy's accounts).")
@click.option("--population", default=None, type=click.IntRange(min=1),
              help="Accounts that could have received the answers (Bonferroni count).")
def probe(target: str, dialect: str, prompts: Path, model: str, api_key: str,
          policy_path: Path, null_keys: int, as_json: bool, index_path: Path | None,
          population: int | None) -> None:
    """Query a suspect model with prompts and score its answers (a distilled student?)."""
    import httpx

    from guardproxy.canary.detect import detect as run_detect

    keys, accounts = _setup(policy_path)
    index = _index(keys, accounts, index_path, population)
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
    verdict = run_detect(keys, answers, index, null_keys=null_keys, population=population)
    if math.isnan(verdict.null_exceed) and not as_json:
        click.echo("(no empirical null computed)")
    _report(verdict, as_json, [f"answer {i + 1}" for i in range(len(answers))])


@canary.group()
def index() -> None:
    """The account index detection reads: build it once, for up to millions of accounts."""


@index.command()
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Index file to write (default: next to the policy, <name>.canary-index).")
@click.option("--accounts", "extra", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file of more account ids, one per line (accounts not in the "
                   "policy's accounts file); may be repeated.")
def build(policy_path: Path, out: Path | None, extra: tuple[Path, ...]) -> None:
    """Write the codewords of every known account to an index file, read by --index."""
    import itertools

    from guardproxy.canary.index import read_ids, write_index

    keys, accounts = _setup(policy_path)
    out = out or policy_path.with_name(policy_path.stem + ".canary-index")
    start = time.perf_counter()
    try:
        count = write_index(out, keys, itertools.chain(accounts, *map(read_ids, extra)),
                            policy_accounts=accounts)
    except (OSError, UnicodeDecodeError) as exc:
        click.echo(f"{getattr(exc, 'filename', None) or out}: "
                   f"{getattr(exc, 'strerror', None) or exc}", err=True)
        sys.exit(1)
    click.echo(f"{out}: {count} accounts ({len(accounts)} from the policy), "
               f"{out.stat().st_size / 1e6:.1f} MB, in {time.perf_counter() - start:.1f} s")
