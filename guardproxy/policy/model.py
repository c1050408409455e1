"""The typed policy: frozen dataclasses built once from a validated file."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from guardproxy.policy.match import Match

if TYPE_CHECKING:  # linkage.settings reads policies: importing it here would be a cycle
    from guardproxy.audit.settings import AuditSettings
    from guardproxy.linkage.settings import LinkageSettings

Mode = Literal["enforce", "shadow"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    dialect: str
    headers: tuple[tuple[str, str], ...]
    timeout: float
    connect_timeout: float
    # Which body field(s) carry the output cap the proxy reserves for ("max_tokens",
    # "max_completion_tokens" or "both"); None: the dialect's default.
    cap_field: str | None = None
    # "inject": ask streamed responses for usage (stream_options.include_usage) and hide
    # the extra chunk; "never": strict upstreams that reject unknown fields.
    stream_usage: str = "inject"
    # One SSE event larger than this ends the stream (bytes).
    max_event_bytes: int = 4 << 20


@dataclass(frozen=True)
class AccountsConfig:
    keys_file: Path | None
    trust_header: str | None


@dataclass(frozen=True)
class ClientsConfig:
    trusted_proxies: tuple[IPNetwork, ...]
    max_body_bytes: int


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules:``; ``settings`` is the rule kind's own frozen dataclass."""

    name: str
    kind: str
    mode: Mode
    when: Match
    per: tuple[str, ...]
    settings: Any
    line: int
    on_store_error: Literal["deny", "allow"] = "deny"
    audit_include: tuple[str, ...] = ()   # text fields the requests it decides carry

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"


@dataclass(frozen=True)
class Account:
    id: str
    org: str
    tier: str
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Policy:
    source: Path
    upstream: UpstreamConfig
    state: str
    key_prefix: str
    accounts: AccountsConfig
    clients: ClientsConfig
    rules: tuple[Rule, ...]
    admin_token: str | None = None
    # paths (shell globs) the guards never see: /health, /docs, /openapi.json …
    unguarded: tuple[str, ...] = ()
    # sha256 hex of an API key -> account; loaded from accounts.keys
    keys: dict[str, Account] = field(default_factory=dict, compare=False, hash=False)
    # text -> tokens, from the policy's ``tokenizer: module:function`` (None: estimator)
    tokenizer: Callable[[str], int] | None = field(default=None, compare=False, hash=False)
    # the top-level ``linkage:`` section (None: accounts are counted alone)
    linkage: LinkageSettings | None = None
    # the top-level ``audit:`` section (None: no audit trail)
    audit: AuditSettings | None = None
    # ``admin.listen``: serve /admin on its own address, never on the proxy's port
    admin_listen: tuple[str, int] | None = None
