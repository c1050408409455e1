"""OpenAI shapes: chat completions, legacy completions, the Responses API, embeddings.

Streams interleave the choices (one chunk per choice per word, choice indexes
alternating), as vLLM sends ``n > 1``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from guardproxy.fake_model.text import Job, piece
from guardproxy.fake_model.wire import Piece, event


def completion_json(job: Job) -> dict[str, Any]:
    chat = job.kind == "chat"
    choices = []
    for index, words in enumerate(job.choices):
        text = " ".join(words)
        choices.append(
            {"index": index, "message": {"role": "assistant", "content": text},
             "finish_reason": job.finish, "logprobs": None} if chat else
            {"index": index, "text": text, "finish_reason": job.finish, "logprobs": None})
    out: dict[str, Any] = {**_base(job, chunk=False), "choices": choices}
    if job.usage_on:
        out["usage"] = job.usage()
    return out


def completion_stream(job: Job) -> Iterator[Piece]:
    """Role chunks (chat), then word by word: the hidden best_of sequences' tokens, then
    one chunk per returned choice; a finishing chunk per choice (unless
    ``finish-with-content`` put finish_reason on the last word); the usage chunk when
    asked for; ``[DONE]`` (unless ``unterminated``). With ``partial-usage`` every chunk
    carries the cumulative usage (vLLM's continuous_usage_stats)."""
    chat = job.kind == "chat"
    behave = job.behave
    base = _base(job, chunk=True)
    continuous = behave.partial_usage and job.usage_on
    raw = behave.line_separators
    done = 0

    def chunk(index: int, content: str | None, finish: str | None, role: bool = False) -> Piece:
        choice: dict[str, Any] = {"index": index}
        if chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role else
                               {"content": content} if content is not None else {})
        else:
            choice["text"] = content or ""
        choice["finish_reason"] = finish
        obj: dict[str, Any] = {**base, "choices": [choice]}
        if continuous:
            obj["usage"] = job.usage(done)
        return Piece(event(obj, raw_unicode=raw),
                     full_usage=continuous and done == job.completion_tokens)

    if chat:
        for index in range(len(job.choices)):
            yield chunk(index, None, None, role=True)
    finish_on_content = behave.finish_with_content and job.length > 0
    for i in range(job.length):
        for _ in range(job.hidden):
            done += 1
            yield Piece("", tokens=1)
        last = i == job.length - 1
        for index, words in enumerate(job.choices):
            done += 1
            sent = chunk(index, piece(words, i), job.finish if last and finish_on_content
                         else None)
            yield Piece(sent.data, 1, sent.full_usage)
    if not finish_on_content:
        for index in range(len(job.choices)):
            yield chunk(index, None if chat else "", job.finish)
    if job.usage_on and job.params.include_usage:
        yield Piece(event({**base, "choices": [], "usage": job.usage()}, raw_unicode=raw),
                    full_usage=True)
    if not behave.unterminated:
        yield Piece("data: [DONE]\n\n")


def _base(job: Job, chunk: bool) -> dict[str, Any]:
    chat = job.kind == "chat"
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat \
        else "text_completion"
    return {"id": "chatcmpl-fake" if chat else "cmpl-fake", "created": job.created,
            "model": job.model, "object": kind}


def responses_json(job: Job) -> dict[str, Any]:
    """OpenAI's Responses API: one message item with one output_text part."""
    text = " ".join(job.choices[0])
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
            "content": [part]}
    out: dict[str, Any] = {"id": "resp_fake", "object": "response", "created_at": job.created,
                           "model": job.model, "status": "completed", "output": [item]}
    if job.usage_on:
        out["usage"] = {"input_tokens": job.prompt, "output_tokens": job.completion_tokens,
                        "total_tokens": job.prompt + job.completion_tokens}
    return out


def responses_stream(job: Job) -> Iterator[Piece]:
    out = responses_json(job)
    item = out["output"][0]
    part = item["content"][0]
    words = job.choices[0]
    raw = job.behave.line_separators
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    number = 0

    def step(obj: dict[str, Any], tokens: int = 0, full: bool = False) -> Piece:
        nonlocal number
        number += 1
        return Piece(event({**obj, "sequence_number": number - 1}, obj["type"],
                           raw_unicode=raw), tokens, full)

    yield step({"type": "response.created",
                "response": {**out, "status": "in_progress", "output": []}})
    yield step({"type": "response.output_item.added", "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []}})
    yield step({"type": "response.content_part.added", **where, "part": {**part, "text": ""}})
    for i in range(len(words)):
        yield step({"type": "response.output_text.delta", **where, "delta": piece(words, i)}, 1)
    yield step({"type": "response.output_text.done", **where, "text": part["text"]})
    yield step({"type": "response.content_part.done", **where, "part": part})
    yield step({"type": "response.output_item.done", "output_index": 0, "item": item})
    yield step({"type": "response.completed", "response": out}, full=job.usage_on)


def embeddings_json(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    given = body.get("input")
    inputs: list[Any] = given if isinstance(given, list) else [given]
    return {"object": "list", "model": job.model, "data": [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
        for i in range(len(inputs))],
        "usage": {"prompt_tokens": job.prompt, "total_tokens": job.prompt}}
