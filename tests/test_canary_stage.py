"""The canary stage on raw SSE bytes, run by a ResponseDriver: any chunking, tool calls
untouched, valid framing, held-back text in order, shadow mode byte-identical."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage
from guardproxy.dialects import get_dialect
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import UsageMeter
from tests.streams import JSON, SSE, drive, feed, frame, parsed, pieces

KEYS = CanaryKeys("stage-secret-0123456789abcdef")
TEXT = (Path(__file__).parent / "data" / "prose.txt").read_text()[:1500]
TOOL = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
    "tool_calls": [{"index": 0, "function": {"arguments": "{\"often\": \"big quickly\"}"}}]},
    "finish_reason": None}]}


def marker() -> Marker:
    return Marker(KEYS, KEYS.code("alice"))


def marked(text: str) -> str:
    return marker().mark(text)


def sse_line(obj: Any, name: str = "") -> bytes:
    head = f"event: {name}\n" if name else ""
    return (head + "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()


def openai_stream(pieces_: list[str]) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces_]
    events.insert(len(events) // 2, TOOL)
    events.append({"id": "c", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(sse_line(e) for e in events) + b"data: [DONE]\n\n"


def anthropic_stream(pieces_: list[str]) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {"usage": {}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": p}})
               for p in pieces_]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(sse_line(d, n) for n, d in events)


def run(dialect: str, body: bytes, cuts: list[int], *, rewrite: bool = True) -> bytes:
    stage = CanaryStage(dialect, marker, rewrite=rewrite)
    return drive([stage], 200, SSE, body, cuts)


def split(text: str, sizes: list[int]) -> list[str]:
    out: list[str] = []
    i = 0
    for size in itertools.cycle(sizes or [7]):
        if i >= len(text):
            return out
        out.append(text[i:i + size])
        i += size
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_openai_stream_marks_equal_whole_text_for_any_chunking(sizes: list[int],
                                                               cuts: list[int]) -> None:
    body = openai_stream(split(TEXT, sizes))
    out = run("openai", body, cuts)
    events = parsed(out)
    text = "".join(d["choices"][0]["delta"].get("content", "")
                   for _, d in events if isinstance(d, dict) and d.get("choices"))
    assert text == marked(TEXT)
    tool_line = sse_line(TOOL)
    assert tool_line in out, "tool-call events pass byte-identical"
    assert out.endswith(b"data: [DONE]\n\n")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_anthropic_stream_marks_equal_whole_text_for_any_chunking(sizes: list[int],
                                                                  cuts: list[int]) -> None:
    out = run("anthropic", anthropic_stream(split(TEXT, sizes)), cuts)
    events = parsed(out)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == marked(TEXT)
    names = [n for n, _ in events]
    assert names[-2:] == ["content_block_stop", "message_stop"]


def test_error_and_non_text_responses_pass_untouched() -> None:
    body = json.dumps({"error": {"message": "often big"}}).encode()
    assert drive([CanaryStage("openai", marker)], 429, JSON, body) == body
    audio = b"often big \x00\xff" * 100
    assert drive([CanaryStage("openai", marker)], 200, [(b"content-type", b"audio/mpeg")],
                 audio, [7]) == audio


def responses_stream(pieces_: list[str]) -> bytes:
    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    text = "".join(pieces_)
    steps: list[dict[str, object]] = [
        {"type": "response.created", "response": {"object": "response", "output": []}}]
    steps += [{"type": "response.output_text.delta", **where, "delta": p} for p in pieces_]
    steps += [{"type": "response.output_text.done", **where, "text": text},
              {"type": "response.completed", "response": {"object": "response", "output": [
                  {"type": "message", "content": [{"type": "output_text", "text": text}]}]}}]
    return b"".join(sse_line({**s, "sequence_number": n}, str(s["type"]))
                    for n, s in enumerate(steps))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_responses_stream_marks_deltas_and_every_final_copy(sizes: list[int],
                                                            cuts: list[int]) -> None:
    out = run("openai", responses_stream(split(TEXT, sizes)), cuts)
    events = parsed(out)
    expected = marked(TEXT)
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    (done,) = [d["text"] for n, d in events if n == "response.output_text.done"]
    (final,) = [d["response"]["output"][0]["content"][0]["text"]
                for n, d in events if n == "response.completed"]
    assert deltas == done == final == expected


# -- held-back text ---------------------------------------------------------------------
def chat_chunk(text: str | None, finish: str | None = None, index: int = 0,
               **extra: Any) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"id": "c", "object": "chat.completion.chunk", **extra,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 100_000), max_size=25))
def test_last_text_and_finish_in_one_chunk_carry_the_held_back_word(cuts: list[int]) -> None:
    """vLLM, llama.cpp and TGI send the last text and ``finish_reason`` in one chunk: the
    held-back word goes out in that chunk, no extra event, the text in order."""
    words = ["It is ", "often a big", " and quickly simple plan, often"]
    body = b"".join(sse_line(chat_chunk(w)) for w in words[:-1]) + \
        sse_line(chat_chunk(words[-1], "stop")) + b"data: [DONE]\n\n"
    out = run("openai", body, cuts)
    events = parsed(out)
    assert len(events) == len(frame(body)[0]), "no event was added"
    assert [d["choices"][0]["finish_reason"] for _, d in events[:-1]] == [None, None, "stop"]
    assert "".join(d["choices"][0]["delta"]["content"] for _, d in events[:-1]) == \
        marked("".join(words))


def test_held_back_word_goes_out_before_the_chunk_that_ends_its_choice() -> None:
    body = b"".join(sse_line(c) for c in (
        chat_chunk("It is often"), chat_chunk(None, "stop"))) + b"data: [DONE]\n\n"
    events = parsed(run("openai", body, []))
    assert [d["choices"][0]["finish_reason"] for _, d in events[:-1]] == [None, None, "stop"]
    assert "".join(d["choices"][0]["delta"].get("content", "") for _, d in events[:-1]) == \
        marked("It is often")


def test_held_back_words_of_interleaved_choices_stay_with_their_choice() -> None:
    chunks = [chat_chunk("It is often", index=0), chat_chunk("Perhaps big", index=1),
              chat_chunk(" simple", "stop", index=1), chat_chunk(None, "length", index=0)]
    body = b"".join(sse_line(c) for c in chunks) + b"data: [DONE]\n\n"
    events = parsed(run("openai", body, [3, 50, 200]))
    texts: dict[int, str] = {}
    for _, d in events[:-1]:
        (choice,) = d["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + \
            choice["delta"].get("content", "")
    assert texts == {0: marked("It is often"), 1: marked("Perhaps big simple")}


def test_a_chat_chunk_without_an_object_field_gets_a_chat_shaped_carrier() -> None:
    """Some OpenAI-compatible servers leave ``object`` out of chat chunks. The event that
    carries the held-back word must still be a chat chunk (``delta.content``): a
    completions-shaped ``text`` choice would be ignored by chat clients, and the word lost.
    """
    chunks = [chat_chunk("It is often"), chat_chunk(None, "stop")]
    for chunk in chunks:
        del chunk["object"]
    body = b"".join(sse_line(c) for c in chunks) + b"data: [DONE]\n\n"
    events = parsed(run("openai", body, []))
    text = "".join(d["choices"][0].get("delta", {}).get("content", "") for _, d in events[:-1])
    assert text == marked("It is often")


def test_stream_without_finish_or_done_still_gets_its_held_back_word() -> None:
    body = sse_line(chat_chunk("It is often"))
    events = parsed(run("openai", body, [10]))
    assert "".join(d["choices"][0]["delta"]["content"] for _, d in events) == \
        marked("It is often")


# -- shadow mode ------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["openai", "anthropic", "responses"]),
       st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.lists(st.integers(0, 100_000), max_size=25))
def test_shadow_mode_passes_the_upstream_bytes_and_records_the_text(
        kind: str, sizes: list[int], cuts: list[int]) -> None:
    make = {"openai": openai_stream, "anthropic": anthropic_stream,
            "responses": responses_stream}[kind]
    body = make(split(TEXT, sizes))
    recorded: list[str] = []

    async def record(text: str) -> None:
        recorded.append(text)

    stage = CanaryStage("anthropic" if kind == "anthropic" else "openai",
                        lambda: Marker(KEYS, KEYS.code("alice"), channels=()), record,
                        rewrite=False)
    assert drive([stage], 200, SSE, body, cuts) == body
    assert recorded == [TEXT], "the ledger gets the text the client got"


def test_shadow_mode_leaves_json_bodies_alone() -> None:
    body = json.dumps({"choices": [{"index": 0, "message": {"content": TEXT}}]}).encode()
    stage = CanaryStage("openai", marker, rewrite=False)
    assert drive([stage], 200, JSON, body, [100]) == body
    enforced = drive([CanaryStage("openai", marker)], 200, JSON, body, [100])
    assert json.loads(enforced)["choices"][0]["message"]["content"] == marked(TEXT)


# -- malformed upstreams ------------------------------------------------------------------
sse_noise = st.lists(st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"data: {", b"data: []\n\n", b"data: [DONE]\n\n", b"\n\n", b"\r\n",
                     b'data: {"choices": [{"delta": {"content": 3}}]}\n\n',
                     b'data: {"choices": "x"}\n\n', b'data: {"type": "response.output_text'
                     b'.done", "text": null}\n\n', b'event: content_block_delta\ndata: '
                     b'{"type": "content_block_delta", "delta": {"type": "text_delta", '
                     b'"text": "often "}}\n\n', b"data: \xff\xfe\n\n",
                     b'data: {"choices": [{"index": "x", "delta": {"content": "often "}}]}\n\n',
                     b'data: {"choices": [{"delta": {"content": "a"}, "finish_reason": 1}]}\n\n',
                     b'data: {"type": "content_block_stop", "index": [1]}\n\n',
                     b'data: {"type": "response.output_text.delta", "output_index": "a", '
                     b'"delta": "often "}\n\n', b'data: {"usage": {"prompt_tokens": "x"}}\n\n',
                     b'data: {"choices": [], "usage": []}\n\n'])), max_size=30)


def stages_for(dialect: str, headers: list[tuple[bytes, bytes]],
               hide: bool) -> tuple[ResponseDriver, list[ResponseStage]]:
    stages: list[ResponseStage] = [UsageMeter(get_dialect(dialect), [], 10, hide, 100),
                                   CanaryStage(dialect, marker)]
    driver = ResponseDriver(stages, 1 << 20)
    driver.start(200, headers)
    return driver, stages


@settings(max_examples=300, deadline=None)
@given(sse_noise, st.sampled_from(["openai", "anthropic"]))
def test_stages_never_raise_on_malformed_upstream_streams(parts: list[bytes],
                                                          dialect: str) -> None:
    """Whatever bytes an upstream sends, the response stages pass something on and never
    raise: a stage that raises is dropped by the driver (the response would go on
    unmarked and unmetered)."""
    driver, stages = stages_for(dialect, SSE, hide=True)
    feed(driver, parts or [b""])
    asyncio.run(driver.finish(Ending.COMPLETED))
    assert driver.active == stages, "no stage raised"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["choices", "content", "message", "text", "usage",
                                       "output", "object", "type", "index", "delta"]),
                      inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["openai", "anthropic"]),
       st.lists(st.integers(0, 1000), max_size=4))
@example({"choices": [{"index": [0], "message": {"content": "often big"}}]}, "openai", [])
def test_stages_pass_any_json_body_without_raising(value: object, dialect: str,
                                                   cuts: list[int]) -> None:
    body = json.dumps(value).encode()
    driver, stages = stages_for(dialect, JSON, hide=False)
    out = feed(driver, pieces(body, cuts))
    assert driver.active == stages, "no stage raised"
    assert json.loads(out) is not None or out == b"null"
