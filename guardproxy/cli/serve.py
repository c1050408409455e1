"""``guardproxy serve``, ``check`` and ``fake-model``."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click

from guardproxy.errors import PolicyError, Problem
from guardproxy.policy.load import load_policy
from guardproxy.policy.model import Policy
from guardproxy.policy.source import one_line

T = TypeVar("T")


def _load_or_exit(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            click.echo(one_line(str(problem)), err=True)
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
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              envvar="GUARDPROXY_POLICY",
              help="Policy YAML file (with --demo it defaults to the built-in demo policy).")
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
@click.option("--watch-interval", default=1.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0), envvar="GUARDPROXY_WATCH_INTERVAL",
              help="Seconds between looks at the policy and accounts files (a change "
                   "reloads the policy); 0: reload on SIGHUP or POST /admin/reload only.")
def serve(policy_path: Path | None, host: str, port: int, workers: int, log_level: str,
          access_log: bool, upstream: str | None, demo: bool, watch_interval: float) -> None:
    """Run the proxy in front of the upstream named in the policy."""
    import uvicorn

    from guardproxy.app import POLICY_ENV, UPSTREAM_ENV, WATCH_ENV
    from guardproxy.policy.demo import DEMO_POLICY
    from guardproxy.policy.lint import format_warning, locate, policy_warnings
    from guardproxy.policy.values import has_credentials, parse_url, redact_url
    from guardproxy.state import scheme_of

    if demo and upstream:
        raise click.UsageError("--demo forwards to the fake model it starts: drop --upstream")
    if policy_path is None:
        if not demo:
            raise click.UsageError("give --policy FILE (or set GUARDPROXY_POLICY), or --demo "
                                   "to try the built-in demo policy")
        policy_path = DEMO_POLICY
    if upstream is not None:
        try:
            upstream = parse_url(upstream)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--upstream") from None
    policy = _load_or_exit(policy_path)
    for warning in policy_warnings(policy):
        click.echo(format_warning(warning), err=True)
    if upstream and has_credentials(upstream) and any(
            name.lower() == "authorization" for name, _ in policy.upstream.headers):
        raise click.BadParameter("its user:password and the policy's upstream.headers "
                                 "Authorization would both set Authorization: keep one",
                                 param_hint="--upstream")
    if not (policy.upstream.url or upstream or demo):
        line = locate(policy_path, "upstream", "url")
        click.echo(one_line(str(Problem(str(policy_path), line, "upstream.url",
                                        "required to serve (or pass --upstream)"))), err=True)
        sys.exit(1)
    if workers > 1 and scheme_of(policy.state) == "memory":
        click.echo(f"{policy_path}: state is memory:// but --workers {workers}: each worker "
                   "would count alone. Use a redis:// state or --workers 1.", err=True)
        sys.exit(2)
    if workers > 1 and policy.audit is not None and policy.audit.path != "-" \
            and "{pid}" not in policy.audit.path:
        click.echo(f"{policy_path}: audit.path {policy.audit.path!r} with --workers {workers}: "
                   "the workers would interleave one file (and break its chain). Put {pid} "
                   "in the path (one file per worker) or use --workers 1.", err=True)
        sys.exit(2)
    if workers > 1 and policy.admin_listen is not None:
        click.echo(f"{policy_path}: admin.listen needs --workers 1 (the admin API answers "
                   "from one process's memory; each worker would need its own port). Run "
                   "more replicas of one worker, or drop admin.listen.", err=True)
        sys.exit(2)
    if demo:
        from guardproxy.cli.demo import start_fake_model_thread

        upstream = start_fake_model_thread()
        click.echo(f"demo: fake model API on {upstream}", err=True)
    if upstream:
        os.environ[UPSTREAM_ENV] = upstream
        policy = replace(policy, upstream=replace(policy.upstream, url=upstream))
    # absolute, symlinks kept: a Kubernetes ConfigMap swaps a symlink, and the resolved
    # file lives in a folder the kubelet deletes after the swap
    os.environ[POLICY_ENV] = os.path.abspath(policy_path)
    os.environ[WATCH_ENV] = str(watch_interval)
    admin = f", admin on http://{_address(policy.admin_listen)}" if policy.admin_listen else ""
    click.echo(f"guardproxy on http://{host}:{port} -> {redact_url(policy.upstream.url)} "
               f"({policy.upstream.dialect}, {len(policy.rules)} rules, "
               f"state {redact_url(policy.state)}{admin})", err=True)
    # proxy_headers=False: uvicorn would otherwise take the client address from
    # X-Forwarded-For whenever the peer is 127.0.0.1, behind clients.trusted_proxies' back
    options: dict[str, Any] = dict(factory=True, host=host, port=port, workers=workers,
                                   log_level=log_level, access_log=access_log,
                                   server_header=False, date_header=False,
                                   proxy_headers=False)
    if policy.admin_listen is not None:
        _serve_with_admin(uvicorn.Config("guardproxy.app:app_from_env", **options),
                          policy.admin_listen)
    elif workers > 1:
        with _multiprocess_metrics():
            uvicorn.run("guardproxy.app:app_from_env", **options)
    else:
        uvicorn.run("guardproxy.app:app_from_env", **options)


def _address(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serve_with_admin(config: Any, listen: tuple[str, int]) -> None:
    """One uvicorn server, one process, two listening sockets: the proxy's and the admin
    API's. The app tells them apart by the local address a connection arrived on
    (``ProxyApp.admin_address``); one lifespan, one signal handling, one shutdown."""
    import uvicorn

    from guardproxy.app import ADMIN_ENV

    admin_config = uvicorn.Config(config.app, host=listen[0], port=listen[1],
                                  log_level=config.log_level)
    proxy_socket = config.bind_socket()       # logs "Uvicorn running on …" for each
    admin_socket = admin_config.bind_socket()
    bound = admin_socket.getsockname()
    os.environ[ADMIN_ENV] = _address((str(bound[0]), int(bound[1])))
    server = uvicorn.Server(config)
    server.run(sockets=[proxy_socket, admin_socket])
    if not server.started:   # as uvicorn.run: the app failed to start
        sys.exit(3)


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[None]:
    """Several workers write their metrics to files in PROMETHEUS_MULTIPROC_DIR, merged
    at each scrape: a fresh temporary one (removed at exit) unless it is set."""
    from guardproxy.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    given = os.environ.get(MULTIPROC_ENV)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="guardproxy-metrics-"))
    os.environ[MULTIPROC_ENV] = str(prepare_multiprocess_dir(folder))
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def check(files: tuple[Path, ...]) -> None:
    """Validate policy files (and accounts files): one line per problem,
    FILE:LINE: field: message, and exit 1; warnings read FILE:LINE: warning: … and
    leave the exit code 0."""
    failed = False
    shown: set[str] = set()  # policies sharing one accounts file share its warnings
    for path in files:
        try:
            summary, problems, warnings = _check_file(path)
        except Exception as exc:  # a bug: still one line, never a traceback
            summary, warnings = None, []
            problems = [f"{path}:0: <root>: internal error, please report it: "
                        f"{type(exc).__name__}: {exc}"]
        for line in [*problems, *(w for w in warnings if w not in shown)]:
            click.echo(one_line(line), err=True)
        shown.update(warnings)
        if summary is None:
            failed = True
        else:
            click.echo(one_line(f"{path}: ok ({summary})"))
    sys.exit(1 if failed else 0)


def _check_file(path: Path) -> tuple[str | None, list[str], list[str]]:
    """(summary or None when invalid, problem lines, warning lines) of one file."""
    from guardproxy.identity.keys import read_accounts
    from guardproxy.policy.lint import demo_key_warnings, format_warning, policy_warnings
    from guardproxy.policy.source import LocDict, LocList, read_yaml

    doc = read_yaml(path, os.environ, [])
    if isinstance(doc, LocDict) and "version" not in doc and isinstance(
            doc.get("accounts"), LocList):  # an accounts file, not a policy
        problems: list[Problem] = []
        keys = read_accounts(path, os.environ, problems)
        if problems:
            return None, [str(p) for p in problems], []
        warnings = [format_warning(w) for w in demo_key_warnings(path, keys)]
        accounts = len({a.id for a in keys.values()})
        return f"accounts file, {accounts} accounts, {len(keys)} keys", [], warnings
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return None, [str(p) for p in exc.problems], []
    warnings = [format_warning(w) for w in policy_warnings(policy)]
    return f"{len(policy.rules)} rules, {len(policy.keys)} keys", [], warnings


@click.command("fake-model")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--chunk-delay", default=0.0, show_default=True, type=float,
              help="Seconds between streamed chunks.")
def fake_model(host: str, port: int, chunk_delay: float) -> None:
    """Run a built-in fake OpenAI/Anthropic model API (for demos and tests)."""
    from guardproxy.fake_model import run_fake_model

    run_fake_model(host=host, port=port, chunk_delay=chunk_delay)
