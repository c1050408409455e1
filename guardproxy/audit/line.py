"""One audit line: a ``RequestRecord`` as a JSON object, and the chain's hash.

    {"time": 1764460800.123456, "request_id": "01J…", "method": "POST",
     "path": "/v1/chat/completions", "route": "chat", "dialect": "openai",
     "status": 429, "ending": "denied", "account": "alice", "org": "acme",
     "tier": "free", "cluster": null, "ip": "203.0.113.9", "model": "gpt-4o",
     "decisions": [{"rule": "free-requests", "mode": "enforce", "allowed": false,
                    "window": "3/minute"}],
     "tokens": {"reserved": 0, "settled": 0},
     "upstream_seconds": null, "ttfb_seconds": null, "duration_seconds": 0.000412,
     "bytes_in": 87, "bytes_out": 151, "canary_key_id": null, "ledger_entry_id": null}

Every key above is on every line (null: unknown or not applicable); ``prompt`` and
``response`` are added only when the record carries them (a rule opted in), ``prev``
only with ``chain: true``. ``time`` is when the request ended (unix seconds; it
arrived ``duration_seconds`` earlier: access logs stamp lines so, and the trail is then
in time order);
``*_seconds`` are seconds; ``bytes_*`` bytes; ``ip`` is the client address as the proxy
resolved it (``clients.trusted_proxies``), named as ``guardproxy ingest`` reads it.
Lines are ASCII (``\\uXXXX`` escapes), compact, with no newline inside.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from guardproxy.observe import RequestRecord

# ``prev`` of the first line of a fresh trail: the hash of zero bytes (there is no
# previous line); any other value on a first line means older lines were rotated away
GENESIS = hashlib.sha256(b"").hexdigest()


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def audit_fields(record: RequestRecord) -> dict[str, Any]:
    """The line's object (see the module doc), without ``prev``."""
    out: dict[str, Any] = {
        "time": round(record.time, 6), "request_id": record.request_id,
        "method": record.method, "path": record.path, "route": record.route,
        "dialect": record.dialect, "status": record.status, "ending": record.ending,
        "account": record.account, "org": record.org, "tier": record.tier,
        "cluster": record.cluster, "ip": record.client_ip or None, "model": record.model,
        "decisions": [d.as_json() for d in record.decisions],
        "tokens": {"reserved": record.tokens_reserved, "settled": record.tokens_settled},
        "upstream_seconds": _seconds(record.upstream_seconds),
        "ttfb_seconds": _seconds(record.ttfb_seconds),
        "duration_seconds": _seconds(record.duration_seconds),
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "canary_key_id": record.canary_key_id, "ledger_entry_id": record.ledger_entry_id,
    }
    if record.prompt is not None:
        out["prompt"] = record.prompt
    if record.response is not None:
        out["response"] = record.response
    return out


def encode(fields: dict[str, Any], prev: str | None = None) -> bytes:
    """The line's bytes, without the newline; ``prev`` (a hex digest) added last when
    given. Raises ``ValueError`` for a value JSON cannot carry (NaN)."""
    if prev is not None:
        fields = {**fields, "prev": prev}
    return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode("ascii")


def line_hash(line: bytes) -> str:
    """What the next line's ``prev`` holds: sha256 (hex) of a line's exact bytes, its
    terminating newline excluded."""
    return hashlib.sha256(line).hexdigest()
