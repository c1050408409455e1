"""``guardproxy explain --policy P REQUEST.json``: the operator's dry run of a request.

Reads the counters from the policy's state store and changes none of them; nothing
is sent upstream. REQUEST.json and the report: ``guardproxy.explain.engine``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from guardproxy.cli.serve import _load_or_exit

_MARK = {"allow": "allow", "deny": "DENY ", "none": "  -  ", "unknown": "  ?  "}


@click.command()
@click.argument("request_file", metavar="REQUEST.json",
                type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), required=True,
              envvar="GUARDPROXY_POLICY")
@click.option("--account", help="Explain as this account id (from the accounts file).")
@click.option("--key", envvar="GUARDPROXY_EXPLAIN_KEY",
              help="Explain as the account of this API key (hashed as the proxy does; "
                   "or set GUARDPROXY_EXPLAIN_KEY, which keeps it out of the shell history).")
@click.option("--ip", help="The client address the rules see (default 127.0.0.1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def explain(request_file: Path, policy_path: Path, account: str | None, key: str | None,
            ip: str | None, as_json: bool) -> None:
    """Show which rules match REQUEST.json, what each would decide and why, the body
    that would be forwarded and whether the response would be marked. Changes no
    counter and calls no upstream. REQUEST.json is a request body (sent to the chat
    endpoint) or {"method", "path", "headers", "body"}; "-" reads stdin. Without
    --account or --key, the request's headers name the account, as in the proxy."""
    from guardproxy.explain.engine import ExplainError, ExplainRequest
    from guardproxy.explain.engine import explain as run
    from guardproxy.flow import Pipeline
    from guardproxy.linkage.enricher import open_linkage_store
    from guardproxy.state import open_state, scheme_of

    if account is not None and key is not None:
        raise click.UsageError("give --account or --key, not both")
    try:
        text = sys.stdin.read() if str(request_file) == "-" else request_file.read_text()
        doc = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        click.echo(f"{request_file}: {exc}", err=True)
        sys.exit(2)
    policy = _load_or_exit(policy_path)
    if scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory://, which lives inside the proxy process: "
                   "every counter reads as empty here; ask the running proxy: "
                   "POST /admin/explain", err=True)

    async def report() -> dict[str, Any]:
        state = open_state(policy.state, policy.key_prefix)
        linkage = None if policy.linkage is None else \
            open_linkage_store(policy.linkage, state, on_event=None)
        try:
            pipeline = Pipeline(policy, state)
            request = ExplainRequest.from_json(doc, pipeline.dialect)
            return await run(pipeline, request, account=account, key=key, ip=ip,
                             linkage=linkage)
        finally:
            if linkage is not None:
                await linkage.aclose()
            await state.aclose()

    try:
        found = asyncio.run(report())
    except ExplainError as exc:
        click.echo(f"{request_file}: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(_text(found))


def _text(report: dict[str, Any]) -> str:
    request, acct = report["request"], report["account"]
    who = f"account {acct['id']} (org {acct['org']}, tier {acct['tier']})" if acct \
        else "no account"
    lines = [f"{request['method']} {request['path']}  {who}  ip {report['client_ip']}"]
    if report["cluster"]:
        c = report["cluster"]
        lines.append(f"cluster {c['id']}: {c['size']} account(s)"
                     + (", linked to a blocked account" if c["linked_to_blocked"] else ""))
    for rule in report["rules"]:
        reached = "" if rule["reached"] else "  [not reached]"
        lines.append(f"  [{_MARK.get(rule['decision'], rule['decision'])}] {rule['name']} "
                     f"({rule['kind']}, {rule['mode']}){reached}: {rule['why']}")
    lines.append(("ALLOWED: " if report["allowed"] else "DENIED: ") + report["why"])
    lines.append("response marked: " + ("yes" if report["marked"] else "no"))
    body = report["forwarded_body"]
    if body is not None:
        lines.append("forwarded body: " + json.dumps(body, ensure_ascii=False))
    elif "forwarded_bytes" in report:
        lines.append(f"forwarded body: {report['forwarded_bytes']} bytes, not JSON")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
