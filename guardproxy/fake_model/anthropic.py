"""The Anthropic Messages API shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from guardproxy.fake_model.text import Job, piece
from guardproxy.fake_model.wire import Piece, event


def _message(job: Job) -> dict[str, Any]:
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": job.model,
            "stop_reason": "max_tokens" if job.params.truncated else "end_turn",
            "stop_sequence": None}


def message_json(job: Job) -> dict[str, Any]:
    out = {**_message(job), "content": [{"type": "text", "text": " ".join(job.choices[0])}]}
    if job.usage_on:
        out["usage"] = {"input_tokens": job.prompt, "output_tokens": job.completion_tokens}
    return out


def message_stream(job: Job) -> Iterator[Piece]:
    """message_start (input tokens, output 1), a text block word by word, message_delta
    with the cumulative output tokens, message_stop. ``partial-usage``: message_delta's
    usage also says ``input_tokens: 0``, as SGLang sends. Without usage (``no-usage``),
    both counts are 0, as before."""
    raw = job.behave.line_separators
    message = _message(job)
    words = job.choices[0]
    usage_start = {"input_tokens": job.prompt if job.usage_on else 0, "output_tokens": 1}
    yield Piece(event({"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "usage": usage_start}},
        "message_start", raw_unicode=raw))
    yield Piece(event({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}, "content_block_start",
                      raw_unicode=raw))
    yield Piece(event({"type": "ping"}, "ping"))
    for i in range(len(words)):
        yield Piece(event({"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": piece(words, i)}}, "content_block_delta",
            raw_unicode=raw), tokens=1)
    yield Piece(event({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    usage: dict[str, int] = {"output_tokens": len(words) if job.usage_on else 0}
    if job.behave.partial_usage and job.usage_on:
        usage = {"input_tokens": 0, **usage}
    yield Piece(event({"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": None}, "usage": usage},
        "message_delta"), full_usage=job.usage_on)
    yield Piece(event({"type": "message_stop"}, "message_stop"))
