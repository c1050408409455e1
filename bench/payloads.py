"""Fixed request and response payloads shared by the fake upstream and the clients."""

from __future__ import annotations

import hashlib
import json
from typing import Any

LOOPBACK = "127.0.0.1"
PATH = "/v1/chat/completions"
API_KEY = "gp-bench-0123456789abcdef"
MODEL = "bench-model"
# Request header understood by the fake upstream: after the first SSE event, wait this many
# milliseconds before the rest of the stream. Used by the TTFB probe only (never under load),
# so that "first byte" really is the first event and not the whole stream arriving at once.
GAP_HEADER = "x-bench-first-gap-ms"
CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench0000000000000000000001"
STREAM_CONTENT_CHUNKS = 17  # + 1 role chunk + 1 finish chunk + 1 usage chunk = 20 events


def key_sha256(key: str = API_KEY) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _dumps(body)


def request_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


_USAGE = {"prompt_tokens": 12, "completion_tokens": 17, "total_tokens": 29}


def completion_body() -> bytes:
    """A non-streamed ``chat.completion`` of about 400 bytes, with usage."""
    return _dumps({
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant",
                        "content": "Hello, benchmark! This is a fixed reply from the fake "
                                   "upstream used to measure proxy overhead."},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": _USAGE,
    })


def _chunk(delta: dict[str, Any], finish: str | None, usage: bool = False) -> bytes:
    event: dict[str, Any] = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}],
    }
    if usage:
        event["usage"] = _USAGE
    return b"data: " + _dumps(event) + b"\n\n"


def stream_events() -> list[bytes]:
    """20 ``chat.completion.chunk`` SSE events (the last one carries usage) + ``[DONE]``."""
    events = [_chunk({"role": "assistant", "content": ""}, None)]
    events += [_chunk({"content": f" tok{i}"}, None) for i in range(STREAM_CONTENT_CHUNKS)]
    events.append(_chunk({}, "stop"))
    events.append(_chunk({}, None, usage=True))
    events.append(b"data: [DONE]\n\n")
    return events
