"""Usage from every response shape, read by the usage stage as bytes pass through."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from guardproxy.dialects import get_dialect
from guardproxy.response.events import Ending
from guardproxy.response.sse import SSEFramer
from guardproxy.response.usage import Usage, UsageMeter

SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]


class Recorder:
    def __init__(self) -> None:
        self.closed: list[tuple[Usage, Ending, int]] = []

    async def close(self, usage: Usage, ending: Ending, status: int) -> None:
        self.closed.append((usage, ending, status))


def openai_stream(words: list[str], usage: bool) -> bytes:
    out = []
    for w in words:
        chunk = {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": w}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if usage:
        tail = {"object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": 11, "completion_tokens": len(words),
                          "total_tokens": 11 + len(words)}}
        out.append(b"data: " + json.dumps(tail).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def anthropic_stream(words: list[str]) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {
        "usage": {"input_tokens": 9, "cache_read_input_tokens": 3, "output_tokens": 1}}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": w}})
               for w in words]
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": len(words)}}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


def run(meter: UsageMeter, headers: list[tuple[bytes, bytes]], body: bytes,
        cuts: list[int]) -> bytes:
    meter.start(200, headers)
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in itertools.pairwise(points)]
    out = b""
    for i, piece in enumerate(pieces):
        out += meter.chunk(piece, final=i == len(pieces) - 1)
    return out


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_hidden_include_usage_chunk_any_chunking(cuts: list[int]) -> None:
    body = openai_stream(["Hello", " world", "!"], usage=True)
    meter = UsageMeter(get_dialect("openai"), [], 50, hide_usage_chunk=True)
    out = run(meter, SSE, body, cuts)
    assert out == openai_stream(["Hello", " world", "!"], usage=False)
    assert meter.usage() == Usage(11, 3)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_client_requested_usage_is_kept_byte_identical(cuts: list[int]) -> None:
    body = openai_stream(["a", "b"], usage=True)
    meter = UsageMeter(get_dialect("openai"), [], 50, hide_usage_chunk=False)
    assert run(meter, SSE, body, cuts) == body
    assert meter.usage() == Usage(11, 2)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_anthropic_stream_merges_start_and_delta(cuts: list[int]) -> None:
    body = anthropic_stream(["x"] * 7)
    meter = UsageMeter(get_dialect("anthropic"), [], 50, hide_usage_chunk=False)
    assert run(meter, SSE, body, cuts) == body
    assert meter.usage() == Usage(12, 7)


def test_json_shapes() -> None:
    cases = [
        ("openai", {"usage": {"prompt_tokens": 5, "completion_tokens": 6}}, Usage(5, 6)),
        ("openai", {"usage": {"input_tokens": 5, "output_tokens": 6}}, Usage(5, 6)),
        ("openai", {"usage": {"prompt_tokens": 8, "total_tokens": 8}}, Usage(8, 0)),
        ("anthropic", {"usage": {"input_tokens": 5, "cache_creation_input_tokens": 2,
                                 "output_tokens": 6}}, Usage(7, 6)),
    ]
    for dialect, body, expected in cases:
        meter = UsageMeter(get_dialect(dialect), [], 50, hide_usage_chunk=False)
        raw = json.dumps(body).encode()
        assert run(meter, JSON, raw, [7]) == raw
        assert meter.usage() == expected


def test_missing_usage_falls_back_to_estimate_never_zero() -> None:
    meter = UsageMeter(get_dialect("openai"), [], 40, hide_usage_chunk=False)
    run(meter, SSE, openai_stream(["abcd"] * 10, usage=False), [])
    usage = meter.usage()
    assert usage == Usage(40, 20, reported=False)


async def test_leases_are_closed_with_usage_and_ending() -> None:
    lease = Recorder()
    meter = UsageMeter(get_dialect("openai"), [lease], 40, hide_usage_chunk=False)
    run(meter, SSE, openai_stream(["a"], usage=True), [])
    await meter.finish(Ending.COMPLETED)
    assert lease.closed == [(Usage(11, 1), Ending.COMPLETED, 200)]


def test_framer_handles_crlf_and_holds_partial() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: 1\r\n\r\ndata: 2\n\nda") == [b"data: 1\r\n\r\n", b"data: 2\n\n"]
    assert framer.feed(b"ta: 3\n\n") == [b"data: 3\n\n"]
    assert framer.flush() == b""
