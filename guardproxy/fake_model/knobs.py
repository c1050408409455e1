"""Reading a request as a real server would: the ``x-fake-behave`` knobs, the body's
content type, and the typed fields, strictly (the OpenAI API) or leniently (vLLM).

Every refusal is a ``Refusal``: status, message, and the shape of its body (the dialect's
error JSON, or FastAPI's ``{"detail": [...]}`` for 422).
"""

from __future__ import annotations

import email.message
import json
import re
from dataclasses import dataclass, fields
from typing import Any

MAX_WORDS = 4096       # the longest answer, in words (= tokens)
DEFAULT_CAP = 16       # words when the request names no cap (and cap-field is not set)
MAX_CHOICES = 128      # n and best_of above this are refused, as OpenAI does
CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")  # first wins
INT_FIELDS = (*CAP_FIELDS, "n", "best_of")

_FLAGS = ("finish-with-content", "gzip", "lenient", "partial-usage", "unterminated",
          "line-separators", "own-ratelimit", "strict-fields", "audio", "no-usage",
          "batch-prompts")

# Top-level fields a strict server (pydantic extra=forbid) knows, per endpoint.
# stream_options is deliberately absent: the strict server predates it.
_COMMON = {"model", "stream", "temperature", "top_p", "stop", "user", "metadata", "seed"}
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "chat": frozenset(_COMMON | {
        "messages", "max_tokens", "max_completion_tokens", "n", "best_of", "logprobs",
        "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "tools",
        "tool_choice", "parallel_tool_calls", "response_format"}),
    "completions": frozenset(_COMMON | {
        "prompt", "max_tokens", "n", "best_of", "echo", "logprobs", "suffix",
        "presence_penalty", "frequency_penalty", "logit_bias"}),
    "messages": frozenset(_COMMON | {
        "messages", "max_tokens", "system", "stop_sequences", "top_k", "tools",
        "tool_choice", "thinking"}),
    "responses": frozenset(_COMMON | {
        "input", "instructions", "max_output_tokens", "text", "tools", "tool_choice",
        "store", "include", "previous_response_id", "reasoning"}),
    "embeddings": frozenset({"model", "input", "encoding_format", "dimensions", "user"}),
}

# pydantic's lax mode (what vLLM's request models accept), checked against pydantic in
# tests/test_fake_model.py: surrounding whitespace, a sign, digit groups split by single
# underscores, and a fraction of zeros only.
_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


class Refusal(Exception):
    """An answer that is not a generation: ``status`` with an error body. ``detail`` set
    means FastAPI's own 422 body rather than the dialect's error JSON."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.detail = detail

    def body(self, anthropic: bool) -> dict[str, Any]:
        if self.detail is not None:
            return {"detail": self.detail}
        if anthropic:
            kind = ("api_error" if self.status >= 500 else "rate_limit_error"
                    if self.status == 429 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.kind, "param": None,
                          "code": None}}


@dataclass(frozen=True)
class Behaviour:
    """The knobs of one request (``x-fake-behave``); every field off by default."""

    finish_with_content: bool = False
    gzip: bool = False
    lenient: bool = False
    partial_usage: bool = False
    unterminated: bool = False
    line_separators: bool = False
    own_ratelimit: bool = False
    strict_fields: bool = False
    audio: bool = False
    no_usage: bool = False
    batch_prompts: bool = False
    slow_headers: float = 0.0        # seconds before the response headers
    reset_after: int | None = None   # stream events sent before the connection is cut
    cap_field: str | None = None     # the only field read as the output cap


def parse_behaviour(header: str) -> Behaviour:
    """``"gzip, slow-headers=0.5, cap-field=max_tokens"`` -> Behaviour. An unknown or
    malformed knob is a 400: a misspelt knob must not silently test nothing."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Behaviour)}
    for item in filter(None, (part.strip() for part in header.split(","))):
        name, eq, value = (s.strip() for s in item.partition("="))
        attr = name.replace("-", "_")
        try:
            if not eq and name in _FLAGS:
                values[attr] = True
            elif eq and name == "slow-headers":
                values[attr] = float(value)
                if not 0 <= values[attr] <= 600:
                    raise ValueError(value)
            elif eq and name == "reset-after":
                values[attr] = int(value)
                if values[attr] < 0:
                    raise ValueError(value)
            elif eq and name == "cap-field" and value in CAP_FIELDS:
                values[attr] = value
            else:
                raise ValueError(item)
        except ValueError:
            raise Refusal(400, f"x-fake-behave: unknown or malformed knob {item!r}") from None
    assert set(values) <= names
    return Behaviour(**values)


def fastapi_reads_json(content_type: str | None) -> bool:
    """Whether FastAPI (before 0.132, whose ``strict_content_type`` now refuses a missing
    header) parses a body as JSON: no content type at all, or ``application/json`` or
    ``application/*+json`` in any case, with any parameters (fastapi/routing.py)."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def read_json_body(raw: bytes, content_type: str | None, lenient: bool) -> dict[str, Any]:
    """The body as a JSON object. Lenient: whatever the content type says. Otherwise as
    FastAPI: another content type gets FastAPI's 422 (the body reached a pydantic model
    as bytes)."""
    if not lenient and not fastapi_reads_json(content_type):
        text = raw[:200].decode("utf-8", "replace")
        raise Refusal(422, "body is not JSON", detail=[{
            "type": "model_attributes_type", "loc": ["body"], "input": text,
            "msg": "Input should be a valid dictionary or object to extract fields from"}])
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise Refusal(400, "body is not a JSON object")
    return body


def as_int(name: str, value: Any, lenient: bool) -> int | None:
    """A JSON integer (``None`` when null); lenient also takes pydantic-lax values:
    ``"4"``, ``" +4 "``, ``"4.0"``, ``4.0``, ``true``. Anything else is a 400."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if lenient:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2.0**63:
            return int(value)  # pydantic-core reads floats into an i64
        if isinstance(value, str) and _INT_TEXT.fullmatch(text := value.strip()):
            return int(text.partition(".")[0].replace("_", ""))
    raise Refusal(400, f"Invalid type for '{name}': expected an integer, got {value!r}")


def as_bool(name: str, value: Any, lenient: bool) -> bool | None:
    """A JSON boolean (``None`` when null); lenient also takes ``"true"``/``"off"``…
    in any case, and 0/1 (int or float), as pydantic's lax mode does."""
    if value is None or isinstance(value, bool):
        return value
    if lenient:
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    raise Refusal(400, f"Invalid type for '{name}': expected a boolean, got {value!r}")


@dataclass(frozen=True)
class Params:
    """What the server will generate for one request."""

    stream: bool
    n: int               # choices returned per prompt
    best_of: int         # sequences generated per prompt (>= n; the extra are not returned)
    cap: int             # the output cap in words (tokens)
    words: int           # words per sequence
    truncated: bool      # the cap cut the answer (finish_reason "length")
    include_usage: bool  # stream_options.include_usage


def read_params(kind: str, body: dict[str, Any], behave: Behaviour,
                forced_words: int | None) -> Params:
    """Validate and coerce the typed fields; Refusal(400) when a strict (or lenient)
    server would refuse the request."""
    if behave.strict_fields:
        extra = sorted(set(body) - KNOWN_FIELDS.get(kind, frozenset(body)))
        if extra:
            raise Refusal(400, f"Extra inputs are not permitted: {', '.join(extra)}")
    ints = {k: as_int(k, body.get(k), behave.lenient) for k in INT_FIELDS}
    stream = bool(as_bool("stream", body.get("stream"), behave.lenient))
    n = best_of = 1
    if kind in ("chat", "completions"):
        n = 1 if ints["n"] is None else ints["n"]
        best_of = n if ints["best_of"] is None else ints["best_of"]
        if not 1 <= n <= MAX_CHOICES or not n <= best_of <= MAX_CHOICES:
            raise Refusal(400, f"n must be in 1..{MAX_CHOICES} and best_of in n.."
                               f"{MAX_CHOICES}: got n={n}, best_of={best_of}")
    if behave.cap_field:
        given = ints[behave.cap_field]
        cap = MAX_WORDS if given is None else given
    else:
        cap = next((v for k in CAP_FIELDS if (v := ints[k]) is not None), DEFAULT_CAP)
    words = forced_words if forced_words is not None else min(max(cap, 1), MAX_WORDS)
    options = body.get("stream_options")
    return Params(stream=stream, n=n, best_of=best_of, cap=cap, words=words,
                  truncated=forced_words is None and words >= cap,
                  include_usage=isinstance(options, dict) and bool(options.get("include_usage")))
