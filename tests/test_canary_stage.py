"""The canary stage on raw SSE bytes: any chunking, tool calls untouched, valid framing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage
from guardproxy.response.sse import SSEFramer, event_json

KEYS = CanaryKeys("stage-secret-0123456789abcdef")
TEXT = (Path(__file__).parent / "data" / "prose.txt").read_text()[:1500]
TOOL = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
    "tool_calls": [{"index": 0, "function": {"arguments": "{\"often\": \"big quickly\"}"}}]},
    "finish_reason": None}]}


def openai_stream(pieces: list[str]) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces]
    events.insert(len(events) // 2, TOOL)
    events.append({"id": "c", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


def anthropic_stream(pieces: list[str]) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {"usage": {}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": p}})
               for p in pieces]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


def run(dialect: str, body: bytes, cuts: list[int]) -> bytes:
    stage = CanaryStage(dialect, lambda: Marker(KEYS, KEYS.code("alice")))
    stage.start(200, [(b"content-type", b"text/event-stream")])
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    pairs = list(itertools.pairwise(points))
    return b"".join(stage.chunk(body[a:b], i == len(pairs) - 1)
                    for i, (a, b) in enumerate(pairs))


def split(text: str, sizes: list[int]) -> list[str]:
    out, i = [], 0
    for size in itertools.cycle(sizes or [7]):
        if i >= len(text):
            return out
        out.append(text[i:i + size])
        i += size
    return out


def events_of(body: bytes) -> list[tuple[str, object]]:
    framer = SSEFramer()
    blocks = framer.feed(body)
    assert framer.flush() == b"", "the stream must end on an event boundary"
    return [event_json(b) for b in blocks]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_openai_stream_marks_equal_whole_text_for_any_chunking(sizes: list[int],
                                                               cuts: list[int]) -> None:
    body = openai_stream(split(TEXT, sizes))
    out = run("openai", body, cuts)
    events = events_of(out)
    text = "".join(d["choices"][0]["delta"].get("content", "")  # type: ignore[index]
                   for _, d in events if d and d.get("choices"))  # type: ignore[union-attr]
    assert text == Marker(KEYS, KEYS.code("alice")).mark(TEXT)
    tool_line = b"data: " + json.dumps(TOOL).encode() + b"\n\n"
    assert tool_line in out, "tool-call events pass byte-identical"
    assert out.endswith(b"data: [DONE]\n\n")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_anthropic_stream_marks_equal_whole_text_for_any_chunking(sizes: list[int],
                                                                  cuts: list[int]) -> None:
    out = run("anthropic", anthropic_stream(split(TEXT, sizes)), cuts)
    events = events_of(out)
    text = "".join(d["delta"]["text"] for n, d in events  # type: ignore[index]
                   if n == "content_block_delta")
    assert text == Marker(KEYS, KEYS.code("alice")).mark(TEXT)
    names = [n for n, _ in events]
    assert names[-2:] == ["content_block_stop", "message_stop"]


def test_error_and_non_text_responses_pass_untouched() -> None:
    stage = CanaryStage("openai", lambda: Marker(KEYS, KEYS.code("alice")))
    stage.start(429, [(b"content-type", b"application/json")])
    body = json.dumps({"error": {"message": "often big"}}).encode()
    assert stage.chunk(body, True) == body


def responses_stream(pieces: list[str]) -> bytes:
    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    text = "".join(pieces)
    steps: list[dict[str, object]] = [
        {"type": "response.created", "response": {"object": "response", "output": []}}]
    steps += [{"type": "response.output_text.delta", **where, "delta": p} for p in pieces]
    steps += [{"type": "response.output_text.done", **where, "text": text},
              {"type": "response.completed", "response": {"object": "response", "output": [
                  {"type": "message", "content": [{"type": "output_text", "text": text}]}]}}]
    return b"".join(f"event: {s['type']}\ndata: {json.dumps({**s, 'sequence_number': n})}\n\n"
                    .encode() for n, s in enumerate(steps))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_responses_stream_marks_deltas_and_every_final_copy(sizes: list[int],
                                                            cuts: list[int]) -> None:
    out = run("openai", responses_stream(split(TEXT, sizes)), cuts)
    events = events_of(out)
    expected = Marker(KEYS, KEYS.code("alice")).mark(TEXT)
    deltas = "".join(d["delta"] for n, d in events  # type: ignore[index]
                     if n == "response.output_text.delta")
    (done,) = [d["text"] for n, d in events if n == "response.output_text.done"]  # type: ignore[index]
    (final,) = [d["response"]["output"][0]["content"][0]["text"]  # type: ignore[index]
                for n, d in events if n == "response.completed"]
    assert deltas == done == final == expected


sse_noise = st.lists(st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"data: {", b"data: []\n\n", b"data: [DONE]\n\n", b"\n\n", b"\r\n",
                     b'data: {"choices": [{"delta": {"content": 3}}]}\n\n',
                     b'data: {"choices": "x"}\n\n', b'data: {"type": "response.output_text'
                     b'.done", "text": null}\n\n', b'event: content_block_delta\ndata: '
                     b'{"type": "content_block_delta", "delta": {"type": "text_delta", '
                     b'"text": "often "}}\n\n', b"data: \xff\xfe\n\n"])), max_size=30)


@settings(max_examples=300, deadline=None)
@given(sse_noise, st.sampled_from(["openai", "anthropic"]))
def test_stages_never_raise_on_malformed_upstream_streams(parts: list[bytes],
                                                          dialect: str) -> None:
    """Whatever bytes an upstream sends, the response stages pass something on and never
    raise: a stage that threw would cut the client's response off."""
    from guardproxy.dialects import get_dialect
    from guardproxy.response.usage import UsageMeter

    stage = CanaryStage(dialect, lambda: Marker(KEYS, KEYS.code("alice")))
    meter = UsageMeter(get_dialect(dialect), [], 10, hide_usage_chunk=True)
    headers = [(b"content-type", b"text/event-stream")]
    stage.start(200, headers)
    meter.start(200, headers)
    for i, part in enumerate(parts):
        final = i == len(parts) - 1
        stage.chunk(meter.chunk(part, final), final)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["choices", "content", "message", "text", "usage",
                                       "output", "object", "type", "index", "delta"]),
                      inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["openai", "anthropic"]))
def test_stages_pass_any_json_body_without_raising(value: object, dialect: str) -> None:
    from guardproxy.dialects import get_dialect
    from guardproxy.response.usage import UsageMeter

    body = json.dumps(value).encode()
    stage = CanaryStage(dialect, lambda: Marker(KEYS, KEYS.code("alice")))
    meter = UsageMeter(get_dialect(dialect), [], 10, hide_usage_chunk=False)
    headers = [(b"content-type", b"application/json")]
    stage.start(200, headers)
    meter.start(200, headers)
    out = stage.chunk(meter.chunk(body, True), True)
    assert json.loads(out) is not None or out == b"null"
