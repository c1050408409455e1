"""OpenAI-compatible APIs (OpenAI, vLLM, llama.cpp, TGI, …)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from guardproxy.dialects.base import Dialect, Headers
from guardproxy.errors import RequestError
from guardproxy.guards.base import RateHeaders
from guardproxy.request.plan import (
    DEFERRED,
    NOT_GENERATION,
    RequestPlan,
    boolean,
    cap_of,
    integer,
    model_of,
)

if TYPE_CHECKING:
    from guardproxy.policy.model import UpstreamConfig
    from guardproxy.response.chat_chunk import ChatChunk
    from guardproxy.response.usage import Tally

# generation endpoints (matched on the normalised path's end) and their cap fields
_ENDPOINTS = (("/chat/completions", "chat"), ("/completions", "completions"),
              ("/responses", "responses"))
# llama.cpp reads n_predict before max_tokens, TGI/SGLang accept max_new_tokens: a cap a
# server may read is a cap field (two that disagree are refused, all are rewritten)
_SERVER_CAPS = ("n_predict", "max_new_tokens")
_CAP_FIELDS = {"chat": ("max_tokens", "max_completion_tokens", *_SERVER_CAPS),
               "completions": ("max_tokens", *_SERVER_CAPS),
               "responses": ("max_output_tokens",)}
# upstream.cap_field -> the chat fields written; OpenAI-compatible servers (vLLM, SGLang,
# llama.cpp, TGI) all honour max_tokens, not all honour max_completion_tokens
_CHAT_CAP = {None: ("max_tokens",), "max_tokens": ("max_tokens",),
             "max_completion_tokens": ("max_completion_tokens",),
             "both": ("max_tokens", "max_completion_tokens")}

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
    endpoints = _ENDPOINTS

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

    def plan(self, path: str, body: Mapping[str, Any], upstream: UpstreamConfig) -> RequestPlan:
        endpoint = self.endpoint(path)
        if endpoint is None:
            return DEFERRED if path.endswith("/batches") else NOT_GENERATION
        model = model_of(body, path)
        stream = boolean(body, "stream")
        cap, given = cap_of(body, _CAP_FIELDS[endpoint])
        written = _CHAT_CAP[upstream.cap_field] if endpoint == "chat" \
            else _CAP_FIELDS[endpoint]
        completions = 1
        if endpoint != "responses":
            n = integer(body, "n", minimum=1, maximum=128) or 1
            best_of = integer(body, "best_of", minimum=1, maximum=128) or 1
            completions = max(n, best_of) * _prompts(body) if endpoint == "completions" \
                else max(n, best_of)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object.")
        asked = boolean(options, "include_usage") if options else False
        return RequestPlan(
            endpoint=endpoint, model=model, stream=stream, cap=cap,
            cap_fields=tuple(dict.fromkeys((*written, *given))), completions=completions,
            inject_usage=(stream and endpoint != "responses" and not asked
                          and upstream.stream_usage == "inject"),
            exact=_exact(body, endpoint),
            deferred=endpoint == "responses" and boolean(body, "background"))

    def inject_stream_usage(self, body: dict[str, Any]) -> None:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}

    def read_json(self, body: Mapping[str, Any], tally: Tally) -> None:
        _usage(body.get("usage"), tally)

    def read_event(self, name: str, data: Mapping[str, Any], tally: Tally) -> bool:
        usage = data.get("usage")
        responses_api = name.startswith("response.") \
            or str(data.get("type", "")).startswith("response.")
        if responses_api:
            response = data.get("response")
            if isinstance(response, dict):
                usage = response.get("usage")
            delta = data.get("delta")
            if isinstance(delta, str):
                tally.text_bytes += len(delta.encode())
        has_usage = _usage(usage, tally)
        choices = data.get("choices")
        if not isinstance(choices, list):
            # a chat usage chunk without "choices" is still only usage
            return has_usage and not responses_api
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

    def read_chunk(self, chunk: ChatChunk, tally: Tally) -> bool | None:
        # read_event of that shape: no usage object, one chat choice, text, no tool calls
        tally.text_bytes += len(chunk.content.encode())
        return False


def _usage(usage: Any, tally: Tally) -> bool:
    if not isinstance(usage, dict):
        return False
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    tally.report(prompt if _count(prompt) else None, completion if _count(completion) else None)
    return True


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompts(body: Mapping[str, Any]) -> int:
    """Prompts in a legacy completions request: each gets ``n`` completions (vLLM and
    OpenAI accept a list of strings or of token lists; a list of ints is one prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(
            isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt)
    return 1


def _exact(body: Mapping[str, Any], endpoint: str) -> bool:
    """Whether the answer must reach the client exactly as generated: structured output
    or log-probabilities (types checked, so ``"top_logprobs": "0"`` cannot turn marking
    off while a lenient upstream reads it as 0)."""
    text = body.get("text")  # the Responses API puts structured output in text.format
    for fmt in (body.get("response_format"),
                text.get("format") if isinstance(text, dict) else None):
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
            return True
    if endpoint == "completions":
        return integer(body, "logprobs") is not None
    if endpoint == "chat":
        return boolean(body, "logprobs") or bool(integer(body, "top_logprobs"))
    include = body.get("include")
    return (isinstance(include, list) and any("logprobs" in str(i) for i in include)) \
        or bool(integer(body, "top_logprobs"))
