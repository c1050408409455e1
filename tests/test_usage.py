"""Usage from every response shape, read by the usage stage as a ResponseDriver passes
the bytes through."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from guardproxy.dialects import get_dialect
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending
from guardproxy.response.sse import SSEFramer
from guardproxy.response.usage import Usage, UsageMeter
from tests.streams import JSON, SSE, Headers, drive, feed, pieces


class Recorder:
    ttl = 60.0

    def __init__(self) -> None:
        self.closed: list[tuple[Usage, Ending, int]] = []

    async def renew(self) -> None:
        return None

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
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {
        "type": "message_start", "message": {"usage": {
            "input_tokens": 9, "cache_read_input_tokens": 3, "output_tokens": 1}}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": w}})
               for w in words]
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": len(words)}}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


def meter(dialect: str, prompt_estimate: int, hide: bool, reserved: int = 1000,
          leases: list[Recorder] | None = None) -> UsageMeter:
    return UsageMeter(get_dialect(dialect), list(leases or []), prompt_estimate, hide, reserved)


def run(usage: UsageMeter, headers: Headers, body: bytes, cuts: list[int]) -> bytes:
    return drive([usage], 200, headers, body, cuts, ending=None)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_hidden_include_usage_chunk_any_chunking(cuts: list[int]) -> None:
    body = openai_stream(["Hello", " world", "!"], usage=True)
    usage = meter("openai", 50, hide=True)
    out = run(usage, SSE, body, cuts)
    assert out == openai_stream(["Hello", " world", "!"], usage=False)
    assert usage.usage() == Usage(11, 3)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_client_requested_usage_is_kept_byte_identical(cuts: list[int]) -> None:
    body = openai_stream(["a", "b"], usage=True)
    usage = meter("openai", 50, hide=False)
    assert run(usage, SSE, body, cuts) == body
    assert usage.usage() == Usage(11, 2)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_anthropic_stream_merges_start_and_delta(cuts: list[int]) -> None:
    body = anthropic_stream(["x"] * 7)
    usage = meter("anthropic", 50, hide=False)
    assert run(usage, SSE, body, cuts) == body
    assert usage.usage() == Usage(12, 7)


def test_json_shapes() -> None:
    cases = [
        ("openai", {"usage": {"prompt_tokens": 5, "completion_tokens": 6}}, Usage(5, 6)),
        ("openai", {"usage": {"input_tokens": 5, "output_tokens": 6}}, Usage(5, 6)),
        ("openai", {"usage": {"prompt_tokens": 8, "total_tokens": 8}}, Usage(8, 0, False)),
        ("anthropic", {"usage": {"input_tokens": 5, "cache_creation_input_tokens": 2,
                                 "output_tokens": 6}}, Usage(7, 6)),
    ]
    for dialect, body, expected in cases:
        usage = meter(dialect, 50, hide=False)
        raw = json.dumps(body).encode()
        assert run(usage, JSON, raw, [7]) == raw
        assert usage.usage() == expected


def test_missing_usage_falls_back_to_estimate_never_zero() -> None:
    usage = meter("openai", 40, hide=False)
    run(usage, SSE, openai_stream(["abcd"] * 10, usage=False), [])
    assert usage.usage() == Usage(40, 20, reported=False)


def test_json_without_usage_is_estimated_from_its_text() -> None:
    usage = meter("openai", 40, hide=False)
    body = json.dumps({"choices": [{"message": {"content": "abcd" * 10}}]}).encode()
    run(usage, JSON, body, [3])
    assert usage.usage() == Usage(40, 20, reported=False)


def test_non_text_body_is_charged_the_reserved_output_never_its_size() -> None:
    usage = meter("openai", 40, hide=False, reserved=300)
    run(usage, [(b"content-type", b"audio/mpeg")], b"\x00\xff" * 5000, [100, 2000])
    assert usage.usage() == Usage(40, 300, reported=False)


def test_non_text_body_with_reported_usage_is_charged_that() -> None:
    usage = meter("openai", 40, hide=False, reserved=300)
    body = json.dumps({"usage": {"prompt_tokens": 12, "completion_tokens": 9}}).encode()
    run(usage, [(b"content-type", b"application/json")], body, [5])
    assert usage.usage() == Usage(12, 9)


def test_reported_zero_output_beside_streamed_text_is_no_report() -> None:
    body = openai_stream(["abcd"] * 10, usage=False).replace(
        b"data: [DONE]", b'data: {"choices": [], "usage": {"prompt_tokens": 11, '
        b'"completion_tokens": 0}}\n\ndata: [DONE]')
    usage = meter("openai", 40, hide=False)
    run(usage, SSE, body, [])
    assert usage.usage() == Usage(40, 20, reported=False)


def test_unparsed_text_body_is_charged_its_size() -> None:
    usage = meter("openai", 40, hide=False)
    run(usage, [(b"content-type", b"text/plain")], b"abcd" * 10, [5])
    assert usage.usage() == Usage(40, 20, reported=False)


def test_unreadable_encoding_is_charged_the_reserved_output() -> None:
    usage = meter("openai", 40, hide=True, reserved=700)
    body = b"\x1f\x8b\x08\x00" + b"\x00" * 100
    assert run(usage, [*SSE, (b"content-encoding", b"gzip")], body, [10]) == body
    assert usage.usage() == Usage(40, 700, reported=False)


async def test_leases_are_closed_with_usage_and_ending() -> None:
    lease = Recorder()
    usage = meter("openai", 40, hide=False, leases=[lease])
    driver = ResponseDriver([usage], 1 << 20)
    driver.start(200, SSE)
    feed(driver, pieces(openai_stream(["a"], usage=True), [9]))
    await driver.finish(Ending.COMPLETED)
    assert lease.closed == [(Usage(11, 1), Ending.COMPLETED, 200)]


async def test_a_failing_lease_does_not_keep_the_others_from_settling() -> None:
    class Broken(Recorder):
        async def close(self, usage: Usage, ending: Ending, status: int) -> None:
            raise ConnectionError("store down")

    first, last = Recorder(), Recorder()
    usage = meter("openai", 40, hide=False, leases=[first, Broken(), last])
    driver = ResponseDriver([usage], 1 << 20)
    driver.start(200, SSE)
    feed(driver, [openai_stream(["a"], usage=True)])
    await driver.finish(Ending.DISCONNECTED)
    assert first.closed == last.closed == [(Usage(11, 1), Ending.DISCONNECTED, 200)]


def test_framer_handles_crlf_and_holds_partial() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: 1\r\n\r\ndata: 2\n\nda") == [b"data: 1\r\n\r\n", b"data: 2\n\n"]
    assert framer.feed(b"ta: 3\n\n") == [b"data: 3\n\n"]
    assert framer.flush() == b""
