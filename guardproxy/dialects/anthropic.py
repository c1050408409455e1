"""The Anthropic Messages API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from guardproxy.dialects.base import Dialect, Headers
from guardproxy.guards.base import RateHeaders
from guardproxy.request.plan import (
    DEFERRED,
    NOT_GENERATION,
    RequestPlan,
    boolean,
    cap_of,
    model_of,
)

if TYPE_CHECKING:
    from guardproxy.policy.model import UpstreamConfig
    from guardproxy.response.usage import Tally

_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")

_ERROR_TYPES = {
    "rate_limit": "rate_limit_error",
    "tokens": "rate_limit_error",
    "authentication": "authentication_error",
    "invalid_request": "invalid_request_error",
    "permission": "permission_error",
    "upstream": "api_error",
    "timeout": "api_error",
    "unavailable": "overloaded_error",
}


class AnthropicDialect(Dialect):
    name = "anthropic"
    endpoints = (("/messages", "messages"),)

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key.strip() or None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def error_body(self, status: int, kind: str, code: str, message: str) -> dict[str, object]:
        error_type = "request_too_large" if status == 413 else _ERROR_TYPES.get(kind, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": message}}

    def rate_headers(self, rates: Iterable[RateHeaders], now: float) -> Headers:
        out: Headers = []
        for rate in rates:
            prefix = b"anthropic-ratelimit-" + rate.resource.encode()
            reset = datetime.fromtimestamp(rate.reset_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            out += [
                (prefix + b"-limit", str(rate.limit).encode()),
                (prefix + b"-remaining", str(max(0, rate.remaining)).encode()),
                (prefix + b"-reset", reset.encode()),
            ]
        return out

    def plan(self, path: str, body: Mapping[str, Any], upstream: UpstreamConfig) -> RequestPlan:
        if self.endpoint(path) is None:
            return DEFERRED if path.endswith("/messages/batches") else NOT_GENERATION
        cap, _ = cap_of(body, ("max_tokens",))
        return RequestPlan(endpoint="messages", model=model_of(body, path),
                           stream=boolean(body, "stream"), cap=cap, cap_fields=("max_tokens",))

    def read_json(self, body: Mapping[str, Any], tally: Tally) -> None:
        _usage(body.get("usage"), tally)

    def read_event(self, name: str, data: Mapping[str, Any], tally: Tally) -> bool:
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            # its output_tokens counts the answer so far (1), not the answer
            _usage(message.get("usage") if isinstance(message, dict) else None, tally,
                   final=False)
        elif kind == "message_delta":
            _usage(data.get("usage"), tally)
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict):
                text = delta.get("text", delta.get("partial_json", delta.get("thinking")))
                if isinstance(text, str):
                    tally.text_bytes += len(text.encode())
        return False


def _usage(usage: Any, tally: Tally, final: bool = True) -> None:
    """Input = uncached + cache writes + cache reads; ``message_delta`` output is cumulative."""
    if not isinstance(usage, dict):
        return
    inputs = [usage[f] for f in _INPUT_FIELDS if _count(usage.get(f))]
    output = usage.get("output_tokens")
    tally.report(sum(inputs) if inputs else None, output if _count(output) else None, final)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
