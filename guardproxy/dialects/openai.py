"""OpenAI-compatible APIs (OpenAI, vLLM, llama.cpp, TGI, …)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from guardproxy.dialects.base import Dialect, Headers
from guardproxy.guards.base import RateHeaders

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.response.usage import Tally

# generation endpoint -> fields capping its output, the first one written when absent
_LIMIT_FIELDS = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/responses": ("max_output_tokens",),
}
_STREAM_USAGE_PATHS = ("/chat/completions", "/completions")

_ERROR_TYPES = {
    "rate_limit": "requests",
    "tokens": "tokens",
    "authentication": "invalid_request_error",
    "invalid_request": "invalid_request_error",
    "permission": "permission_error",
    "upstream": "server_error",
    "timeout": "server_error",
    "unavailable": "server_error",
}


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``; sub-second as ``250ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    total = int(seconds + 0.999)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class OpenAIDialect(Dialect):
    name = "openai"

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return headers.get("api-key") or None  # Azure-style clients

    def error_body(self, status: int, kind: str, code: str, message: str) -> dict[str, object]:
        if kind == "authentication":
            code = code or "invalid_api_key"
        return {"error": {"message": message,
                          "type": _ERROR_TYPES.get(kind, "server_error"),
                          "param": None, "code": code or None}}

    def rate_headers(self, rates: Iterable[RateHeaders], now: float) -> Headers:
        out: Headers = []
        for rate in rates:
            if rate.resource not in ("requests", "tokens"):
                continue
            suffix = rate.resource.encode()
            out += [
                (b"x-ratelimit-limit-" + suffix, str(rate.limit).encode()),
                (b"x-ratelimit-remaining-" + suffix, str(max(0, rate.remaining)).encode()),
                (b"x-ratelimit-reset-" + suffix, _duration(rate.reset_at - now).encode()),
            ]
        return out

    def completion_field(self, path: str, body: Mapping[str, Any]) -> str | None:
        for suffix, fields in _LIMIT_FIELDS.items():
            if path.endswith(suffix):
                return next((f for f in fields if isinstance(body.get(f), int)), fields[0])
        return None

    def completions_per_request(self, path: str, body: Mapping[str, Any]) -> int:
        if not path.endswith(("/chat/completions", "/completions")):
            return 1
        counts = [v for v in (body.get("n"), body.get("best_of"))
                  if isinstance(v, int) and not isinstance(v, bool)]
        return max([1, *counts])

    def ensure_stream_usage(self, exchange: Exchange) -> bool:
        body = exchange.json
        if not exchange.streaming or body is None \
                or not exchange.path.endswith(_STREAM_USAGE_PATHS):
            return False
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            return False
        exchange.set_json("stream_options", {**(options if isinstance(options, dict) else {}),
                                             "include_usage": True})
        return True

    def read_json(self, body: Mapping[str, Any], tally: Tally) -> None:
        _usage(body.get("usage"), tally)

    def read_event(self, name: str, data: Mapping[str, Any], tally: Tally) -> bool:
        usage = data.get("usage")
        if name.startswith("response.") or str(data.get("type", "")).startswith("response."):
            response = data.get("response")
            if isinstance(response, dict):
                usage = response.get("usage")
            delta = data.get("delta")
            if isinstance(delta, str):
                tally.text_bytes += len(delta.encode())
        has_usage = _usage(usage, tally)
        choices = data.get("choices")
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str):
                tally.text_bytes += len(text.encode())
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            if isinstance(calls, list):
                tally.text_bytes += len(repr(calls))
        return has_usage and not choices


def _usage(usage: Any, tally: Tally) -> bool:
    if not isinstance(usage, dict):
        return False
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    tally.report(prompt if isinstance(prompt, int) else None,
                 completion if isinstance(completion, int) else None)
    return True
