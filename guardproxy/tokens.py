"""Token estimation for reservations: fast, and conservative by construction.

Byte-level BPE tokenizers (GPT, Claude, Llama) never produce more tokens than the text
has UTF-8 bytes, and on prose produce about one per 4 bytes. Reserving one token per
2 bytes, plus a per-message overhead, over-reserves typical text about twice; the
reservation is settled from the real usage the API reports, so over-estimating only
costs headroom for a request's duration, while under-estimating would let a burst of
concurrent requests overshoot the budget.

A real tokenizer plugs in with the policy's ``tokenizer: module:function`` — any
installed callable from text to a token count, imported when the policy loads (never
downloaded); the per-message overheads are still added.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

BYTES_PER_TOKEN = 2
PER_MESSAGE = 4
PER_REQUEST = 8


def estimate_text(text: str) -> int:
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def _text_parts(value: Any) -> list[str]:
    """Every string that reaches the model from a message ``content`` (str or parts)."""
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for part in value:
            out += _text_parts(part)
    elif isinstance(value, dict):
        for key in ("text", "content", "input", "arguments", "output"):
            if key in value:
                out += _text_parts(value[key])
        if "image_url" in value or value.get("type") in ("image", "input_image"):
            out.append("x" * 1700)  # a high-detail image tile, ~850 tokens
    return out


def load_tokenizer(value: Any) -> Callable[[str], int]:
    """``"package.module:function"`` -> the function; ValueError says what is wrong."""
    if not isinstance(value, str) or value.count(":") != 1:
        raise ValueError("must be 'module:function', e.g. 'mytokens:count'")
    module_name, _, attr = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {attr!r}")
    try:
        probe = function("guardproxy")
    except Exception as exc:
        raise ValueError(f"{value} failed on a test string: {exc!r}") from None
    if not isinstance(probe, int) or isinstance(probe, bool) or probe < 0:
        raise ValueError(f"{value} must return a token count (int >= 0), got {probe!r}")
    count: Callable[[str], int] = function
    return count


def estimate_prompt(body: dict[str, Any],
                    estimate_text: Callable[[str], int] = estimate_text) -> int:
    """Prompt tokens of an OpenAI or Anthropic request body (over-estimated unless a real
    tokenizer is given)."""
    tokens = PER_REQUEST
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            tokens += PER_MESSAGE
            if isinstance(message, dict):
                tokens += sum(estimate_text(t) for t in _text_parts(message.get("content")))
                tokens += sum(estimate_text(t) for t in _text_parts(message.get("tool_calls")))
    for key in ("system", "prompt", "input", "instructions"):
        if key in body:
            tokens += sum(estimate_text(t) for t in _text_parts(body[key]))
    for key in ("tools", "functions", "response_format"):
        if key in body:
            tokens += estimate_text(repr(body[key]))
    return tokens
