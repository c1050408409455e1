"""The per-request object that flows through identity, guards, upstream and response stages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from guardproxy.policy.model import Account


@dataclass(slots=True)
class Exchange:
    method: str
    path: str
    headers: dict[str, str]          # lower-case names; last value wins
    client_ip: str
    account: Account | None = None
    body: bytes | None = None        # buffered only for JSON requests guards read
    json: dict[str, Any] | None = None
    body_changed: bool = False
    request_id: str = ""
    # rule name -> value guards want to surface (rate-limit headers, leases, …)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        value = self.json.get("model") if self.json else None
        return value if isinstance(value, str) else None

    @property
    def streaming(self) -> bool:
        return bool(self.json and self.json.get("stream") is True)

    def attrs(self) -> dict[str, str | None]:
        """The values ``when:`` matches on."""
        acct = self.account
        return {
            "account": acct.id if acct else None,
            "org": acct.org if acct else None,
            "tier": acct.tier if acct else None,
            "model": self.model,
            "path": self.path,
            "method": self.method,
        }

    def set_json(self, key: str, value: Any) -> None:
        """Change a field of the forwarded request body (re-encoded once before forwarding)."""
        assert self.json is not None
        self.json[key] = value
        self.body_changed = True

    def forwarded_body(self) -> bytes:
        if self.body_changed and self.json is not None:
            self.body = json.dumps(self.json, separators=(",", ":")).encode()
            self.body_changed = False
        return self.body or b""
