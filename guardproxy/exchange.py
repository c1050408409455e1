"""The per-request object that flows through identity, guards, upstream and response stages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from guardproxy.policy.model import Account
from guardproxy.request.plan import NOT_GENERATION, RequestPlan


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What an embedding app may read about a guarded request, as
    ``scope["state"]["guardproxy"]``: never the client's key or headers."""

    request_id: str
    account: Account | None
    client_ip: str
    model: str | None


@dataclass(slots=True)
class Exchange:
    method: str
    path: str                        # normalised (request/path.py): what guards and upstream see
    headers: dict[str, str]          # lower-case names; repeated headers joined with ", "
    client_ip: str
    account: Account | None = None
    peer_trusted: bool = False       # the peer is a trusted proxy (clients.trusted_proxies)
    body: bytes | None = None        # buffered when guards read it
    json: dict[str, Any] | None = None
    plan: RequestPlan = NOT_GENERATION
    body_changed: bool = False
    request_id: str = ""
    # values guards hand on within one request (the prompt estimate, …)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        if self.plan.model is not None:
            return self.plan.model
        value = self.json.get("model") if self.json else None
        return value if isinstance(value, str) else None

    @property
    def streaming(self) -> bool:
        return self.plan.stream

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

    def info(self) -> RequestInfo:
        return RequestInfo(self.request_id, self.account, self.client_ip, self.model)

    def set_json(self, key: str, value: Any) -> None:
        """Change a field of the forwarded request body (re-encoded once before forwarding)."""
        assert self.json is not None
        self.json[key] = value
        self.body_changed = True

    def set_cap(self, tokens: int) -> None:
        """Write the output cap the proxy reserved for into every field the plan names,
        so the upstream cannot generate more whichever field it honours."""
        for name in self.plan.cap_fields:
            if self.json is not None and self.json.get(name) != tokens:
                self.set_json(name, tokens)

    def forwarded_body(self) -> bytes:
        if self.body_changed and self.json is not None:
            # ASCII escapes: a lone surrogate the client escaped survives re-encoding
            self.body = json.dumps(self.json, separators=(",", ":")).encode()
            self.body_changed = False
        return self.body or b""
