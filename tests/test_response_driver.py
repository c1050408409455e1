"""The response driver and its SSE framer: linear framing with a bound, spec line ends,
events seen even when the stream ends inside one, JSON bodies parsed once up to a bound,
encoded bodies left alone, and stage failures that never reach the client's bytes."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage
from guardproxy.dialects import get_dialect
from guardproxy.response import driver as driver_module
from guardproxy.response import sse
from guardproxy.response.driver import ResponseAborted, ResponseDriver
from guardproxy.response.events import (
    BaseStage,
    Ending,
    ResponseHead,
    ResponseStage,
    SSEEvent,
    WholeBody,
)
from guardproxy.response.sse import EventTooLarge, SSEFramer, event_fields
from guardproxy.response.usage import Usage, UsageMeter
from guardproxy.tokens import BYTES_PER_TOKEN
from tests.streams import JSON, SSE, drive, feed, frame, framer_blocks, parsed, pieces

KEYS = CanaryKeys("driver-secret-0123456789abcdef")
READ = 64 << 10
cuts = st.lists(st.integers(0, 1 << 20), max_size=25)


def chunk(text: str, finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": {"content": text}, "finish_reason": finish}]}


USAGE_CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}}


def stream(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + b"data: [DONE]\n\n" if done else out


def canary(rewrite: bool = True) -> CanaryStage:
    return CanaryStage("openai", lambda: Marker(KEYS, KEYS.code("alice")), rewrite=rewrite)


def meter(hide: bool = False, reserved: int = 100) -> UsageMeter:
    return UsageMeter(get_dialect("openai"), [], 13, hide, reserved)


class Recorder(BaseStage):
    """Remembers what the driver showed it."""

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.events: list[tuple[bytes, bool]] = []
        self.wholes: list[bytes] = []
        self.other_bytes = 0
        self.endings: list[Ending] = []

    def start(self, head: ResponseHead) -> bool:
        self.head = head
        return True

    def event(self, event: SSEEvent) -> None:
        self.events.append((event.raw, event.terminated))

    def whole(self, body: WholeBody) -> None:
        self.wholes.append(body.raw)

    def other(self, size: int) -> None:
        self.other_bytes += size

    async def finish(self, ending: Ending) -> None:
        self.endings.append(ending)


# -- counting the framer's work ----------------------------------------------------------
class Counting:
    """A compiled pattern that counts calls and the bytes each call may scan."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.calls = 0
        self.scanned = 0

    def _count(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> None:
        self.calls += 1
        self.scanned += max(0, min(endpos, len(string)) - pos)

    def search(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        found = self.pattern.search(string, pos, endpos)
        self._count(string, pos, found.end() if found else endpos)  # up to where it stopped
        return found

    def match(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        self._count(string, pos, endpos)
        return self.pattern.match(string, pos, endpos)

    def finditer(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        self._count(string, pos, endpos)
        return self.pattern.finditer(string, pos, endpos)

    def findall(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        self._count(string, pos, endpos)
        return self.pattern.findall(string, pos, endpos)

    def split(self, string: Any, maxsplit: int = 0) -> Any:
        self._count(string)
        return self.pattern.split(string, maxsplit)


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[Counting]:
    """Every compiled byte pattern of the SSE module, counting its work."""
    counters = []
    for name, value in list(vars(sse).items()):
        if isinstance(value, re.Pattern) and isinstance(value.pattern, bytes):
            counter = Counting(value)
            monkeypatch.setattr(sse, name, counter)
            counters.append(counter)
    return counters


def test_a_20mb_unterminated_event_is_scanned_once(work: list[Counting]) -> None:
    size = 20 << 20
    body = b"data: " + b"x" * size
    framer = SSEFramer(32 << 20)
    reads = 0
    for offset in range(0, len(body), READ):
        assert framer.feed(body[offset:offset + READ]) == []
        reads += 1
    assert framer.flush() == body
    scanned = sum(c.scanned for c in work)
    calls = sum(c.calls for c in work)
    assert scanned <= len(body) + 8 * reads, f"{scanned} bytes scanned for {len(body)}"
    assert calls <= 2 * reads


def test_many_small_events_cost_one_search_each(work: list[Counting]) -> None:
    event = b'data: {"choices":[{"delta":{"content":"hello "}}]}\n\n'
    body = event * 40_000
    framer = SSEFramer()
    blocks = [b for offset in range(0, len(body), READ)
              for b in framer.feed(body[offset:offset + READ])]
    assert blocks == [event] * 40_000
    scanned = sum(c.scanned for c in work)
    assert scanned <= 2 * len(body)
    assert sum(c.calls for c in work) <= 3 * (40_000 + len(body) // READ + 1)


def test_the_driver_frames_a_20mb_event_in_linear_work(work: list[Counting]) -> None:
    size = 20 << 20
    body = b"data: " + b"x" * size + b"\n\n" + b"data: [DONE]\n\n"
    recorder = Recorder()
    driver = ResponseDriver([recorder], 32 << 20)
    driver.start(200, SSE)
    out = feed(driver, [body[i:i + READ] for i in range(0, len(body), READ)])
    assert out == body
    assert [raw for raw, _ in recorder.events] == [body[:size + 8], b"data: [DONE]\n\n"]
    assert sum(c.scanned for c in work) <= 2 * len(body)


def test_an_event_over_the_bound_raises() -> None:
    framer = SSEFramer(1 << 20)
    fed = 0
    with pytest.raises(EventTooLarge):
        for offset in range(0, 4 << 20, READ):
            framer.feed(b"x" * READ if offset else b"data: " + b"x" * (READ - 6))
            fed += READ
    assert fed <= 1 << 20, "raised as soon as the partial event passed the bound"


def test_a_long_stream_of_small_events_never_hits_the_bound() -> None:
    event = b'data: {"choices":[{"delta":{"content":"hello "}}]}\n\n'
    body = event * 5000
    assert framer_blocks(pieces(body, range(0, len(body), 7000)), limit=1000) == [event] * 5000


def test_the_driver_ends_a_response_whose_event_is_over_the_bound() -> None:
    driver = ResponseDriver([meter()], 1 << 20)
    driver.start(200, SSE)
    assert driver.body(stream(chunk("hi "), done=False), False) == stream(chunk("hi "),
                                                                         done=False)
    with pytest.raises(ResponseAborted):
        for _ in range(40):
            driver.body(b"data: " + b"x" * READ, False)


# -- lines end in CR, LF, CRLF and nothing else ------------------------------------------
def events_of(eol: str, lines: list[list[str]]) -> bytes:
    return "".join("".join(line + eol for line in event) + eol for event in lines).encode()


sse_lines = st.lists(st.lists(st.sampled_from(
    ["data: a", "data: {\"b\": 1}", "event: x", ": comment", "data:", "id: 7",
     "data: \u2028\u2029\u0085 \x0b\x0c\x1c\x1d\x1e text", "retry: 5"]),
    min_size=1, max_size=4), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["\n", "\r\n", "\r"]), sse_lines, cuts)
def test_framer_cuts_the_spec_events_for_any_chunking(eol: str, lines: list[list[str]],
                                                      chunking: list[int]) -> None:
    body = events_of(eol, lines)
    blocks, rest = frame(body)
    assert rest == b""
    assert framer_blocks(pieces(body, chunking)) == blocks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data: a", "data: {}", "event: x", ": c"]),
                          st.sampled_from(["\n", "\r\n", "\r"])), min_size=1, max_size=12),
       st.lists(st.integers(0, 11), max_size=4), cuts)
def test_framer_reads_mixed_line_ends_as_the_spec_does(
        lines: list[tuple[str, str]], blanks: list[int], chunking: list[int]) -> None:
    """One upstream may end lines in CRLF, a blank line in CR (``data: 1\\r\\n\\r``) or
    the other way round (``data: 1\\r\\r\\n``): each is a line end, and a blank line ends
    the event, whatever the read boundaries."""
    out = ""
    for n, (line, eol) in enumerate(lines):
        out += line + eol
        if n in blanks or n == len(lines) - 1:
            out += lines[(n + 1) % len(lines)][1]   # a blank line, in another line's end
    body = out.encode()
    blocks, rest = frame(body)
    assert framer_blocks(pieces(body, chunking)) == blocks + ([rest] if rest else [])


def test_unicode_line_separators_inside_data_are_text() -> None:
    data = 'x\u2028y\u2029z\u0085w\x0bv\x0cu\x1ct'
    for eol in ("\n", "\r\n", "\r"):
        body = f"event: e{eol}data: {data}{eol}data: second{eol}{eol}".encode()
        (block,) = framer_blocks([body])
        assert event_fields(block) == ("e", data + "\nsecond")
        obj = json.dumps({"t": data}, ensure_ascii=False)
        event = SSEEvent(f"data: {obj}{eol}{eol}".encode())
        assert event.json == {"t": data}


# -- an event the stream ended inside is still an event ------------------------------------
@settings(max_examples=100, deadline=None)
@given(cuts, st.sampled_from([b"", b"\n", b"\r\n", b"\r"]), st.booleans())
def test_unterminated_usage_chunk_is_read_and_hidden(chunking: list[int], tail: bytes,
                                                     hide: bool) -> None:
    head = stream(chunk("Hello"), chunk(" world", "stop"), done=False)
    body = head + b"data: " + json.dumps(USAGE_CHUNK).encode() + tail
    usage = meter(hide)
    out = drive([usage], 200, SSE, body, chunking)
    assert out == (head if hide else body)
    assert usage.usage() == Usage(21, 4)


def test_stages_see_the_unterminated_last_event() -> None:
    recorder = Recorder()
    body = stream(chunk("a"), done=False) + b'data: {"x": 1}'
    assert drive([recorder], 200, SSE, body, [5, 30]) == body
    assert recorder.events[-1] == (b'data: {"x": 1}', False)
    assert recorder.endings == [Ending.COMPLETED]


@settings(max_examples=100, deadline=None)
@given(cuts, st.sampled_from([b"", b"\n", b"\r"]))
def test_held_back_text_after_a_cut_off_last_event_is_an_event_of_its_own(
        chunking: list[int], tail: bytes) -> None:
    """The upstream broke off inside its last event, with a word still held back: the
    held-back text must not be glued onto that event (the client would read one broken
    data line and lose both)."""
    body = stream(chunk("It is often"), done=False)[:-2] + tail
    out = drive([canary()], 200, SSE, body, chunking)
    text = "".join(obj["choices"][0]["delta"]["content"] for _, obj in parsed(out))
    assert text == Marker(KEYS, KEYS.code("alice")).mark("It is often")


# -- a failing stage never reaches the client's bytes ---------------------------------------
class Boom(BaseStage):
    """Raises in one hook, on its ``after``-th call, having first meddled with the piece
    (as a buggy stage would): its bytes, and with ``meddle_json`` its parsed JSON too,
    so that a driver that merely ignored the exception would pass the meddling on."""

    def __init__(self, hook: str, after: int = 0, meddle_json: bool = False) -> None:
        self.hook = hook
        self.after = after
        self.meddle_json = meddle_json
        self.calls = 0
        self.finished = 0

    def _maybe(self, hook: str) -> None:
        if hook == self.hook:
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError(f"stage bug in {hook}")

    def start(self, head: ResponseHead) -> bool:
        self._maybe("start")
        return True

    def event(self, event: SSEEvent) -> None:
        if self.hook == "event" and self.calls >= self.after:
            event.insert_before(b"data: {\"meddled\": 1}\n\n")
            event.drop()
            obj = event.json
            if self.meddle_json and isinstance(obj, dict) and obj.get("choices"):
                obj["choices"][0]["delta"]["content"] = "MEDDLED often "
        self._maybe("event")

    def whole(self, body: WholeBody) -> None:
        if self.hook == "whole":
            body.replace({"meddled": True})
            obj = body.json
            if self.meddle_json and isinstance(obj, dict) and obj.get("choices"):
                obj["choices"][0]["message"]["content"] = "MEDDLED often"
        self._maybe("whole")

    def end(self) -> bytes:
        self._maybe("end")
        return b""

    async def finish(self, ending: Ending) -> None:
        self.finished += 1


SSE_BODY = stream(chunk("It is often big, "), chunk("and quickly simple."),
                  chunk(" Often", "stop"), USAGE_CHUNK)
JSON_BODY = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Everyone went toward someone."},
     "finish_reason": "stop"}], "usage": {"prompt_tokens": 21, "completion_tokens": 4}}
                       ).encode()


def stages_with(boom: Boom, where: str, hide: bool) -> tuple[list[ResponseStage],
                                                             list[ResponseStage]]:
    """(the stages, the well-behaved ones among them): ``boom`` alone, first, or between
    the usage meter and the canary (the order the proxy runs them in)."""
    if where == "alone":
        return [boom], []
    usage, mark = meter(hide=hide), canary()
    return ([boom, usage, mark] if where == "first" else [usage, boom, mark]), [usage, mark]


def without_boom(headers: list[tuple[bytes, bytes]], body: bytes, where: str,
                 hide: bool) -> bytes:
    return body if where == "alone" else drive([meter(hide=hide), canary()], 200, headers,
                                               body)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["start", "event", "end"]), st.integers(0, 4), cuts,
       st.sampled_from(["first", "alone", "between"]))
def test_a_stage_raising_on_a_stream_never_changes_the_body(
        hook: str, after: int, chunking: list[int], where: str) -> None:
    """Whatever a stage did to an event before it raised is undone, and the bytes the
    framer holds at that moment still reach the client."""
    boom = Boom(hook, after)
    stages, others = stages_with(boom, where, hide=True)
    out = drive(stages, 200, SSE, SSE_BODY, chunking)
    assert out == without_boom(SSE, SSE_BODY, where, True), "as if it were not there"
    assert boom.finished == 1
    for stage in others:
        if isinstance(stage, UsageMeter):
            assert stage.usage() == Usage(21, 4), "the other stages still ran"


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["start", "whole"]), cuts, st.sampled_from(["first", "alone", "between"]))
def test_a_stage_raising_on_a_json_body_never_changes_it(hook: str, chunking: list[int],
                                                         where: str) -> None:
    boom = Boom(hook)
    stages, others = stages_with(boom, where, hide=False)
    out = drive(stages, 200, JSON, JSON_BODY, chunking)
    assert out == without_boom(JSON, JSON_BODY, where, False)
    assert json.loads(out)["usage"] == {"prompt_tokens": 21, "completion_tokens": 4}
    assert boom.finished == 1
    for stage in others:
        if isinstance(stage, UsageMeter):
            assert stage.usage() == Usage(21, 4)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["event", "whole"]), cuts, st.sampled_from(["first", "between"]))
def test_a_stage_raising_after_changing_the_parsed_json_changes_nothing(
        hook: str, chunking: list[int], where: str) -> None:
    """Stages share one parse of each piece. A stage that changed that parse and then
    raised must not pass its change on to the stages after it (a canary would re-encode
    the event from it)."""
    headers, body = (SSE, SSE_BODY) if hook == "event" else (JSON, JSON_BODY)
    stages, _ = stages_with(Boom(hook, meddle_json=True), where, hide=False)
    out = drive(stages, 200, headers, body, chunking)
    assert b"MEDDLED" not in out
    assert out == without_boom(headers, body, where, False)


def test_finish_is_called_once_per_stage_even_when_one_fails_to_finish() -> None:
    class BadFinish(Recorder):
        async def finish(self, ending: Ending) -> None:
            self.endings.append(ending)
            raise RuntimeError("settling failed")

    first, bad, last = Recorder(), BadFinish(), Recorder()
    drive([first, bad, last], 200, SSE, SSE_BODY, ending=Ending.DISCONNECTED)
    assert first.endings == bad.endings == last.endings == [Ending.DISCONNECTED]


# -- JSON bodies -----------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(cuts)
def test_json_is_buffered_parsed_once_and_rewritten(chunking: list[int]) -> None:
    recorder = Recorder()
    out = drive([recorder, canary()], 200, JSON, JSON_BODY, chunking)
    assert recorder.wholes == [JSON_BODY]
    assert out != JSON_BODY, "the canary marked it (so the next test can fail)"
    assert json.loads(out)["usage"] == json.loads(JSON_BODY)["usage"]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts)
def test_json_over_the_limit_passes_unchanged(monkeypatch_limit: None,
                                              chunking: list[int]) -> None:
    recorder = Recorder()
    out = drive([recorder, canary()], 200, JSON, BIG_JSON, chunking)
    assert out == BIG_JSON
    assert recorder.wholes == []
    assert recorder.other_bytes == len(BIG_JSON)


BIG_JSON = json.dumps({"choices": [{"index": 0, "message": {
    "content": "It is often big. " * 200}}]}).encode()


@pytest.fixture
def monkeypatch_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "JSON_LIMIT", len(BIG_JSON) // 2)


def test_json_over_the_limit_is_still_charged_for_its_text(monkeypatch_limit: None) -> None:
    """A body too large to parse cannot report its usage: it is charged its size, like any
    text body guardproxy cannot read, and never zero."""
    usage = meter()
    drive([usage], 200, JSON, BIG_JSON, [1000, 3000])
    assert usage.usage() == Usage(13, -(-len(BIG_JSON) // BYTES_PER_TOKEN), reported=False)


def test_metering_large_text_takes_memory_in_proportion() -> None:
    """Measuring text must not cost memory out of proportion to it (a backtracking
    pattern over a 1 MiB string once took ~140 bytes per byte). Counted with
    tracemalloc, not timed."""
    text = "often big " * (1 << 17)   # 1.25 MiB
    for headers, body in [
            (JSON, json.dumps({"choices": [{"message": {"content": text}}]}).encode()),
            (SSE, b"data: " + json.dumps(chunk(text)).encode() + b"\n\n")]:
        usage = meter()
        driver = ResponseDriver([usage], 8 << 20)
        driver.start(200, headers)
        tracemalloc.start()
        try:
            driver.body(body, True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 12 * len(body), f"{peak / len(body):.0f} bytes per body byte"
        assert usage.usage().completion >= len(text) // BYTES_PER_TOKEN


# -- bodies the driver cannot read -------------------------------------------------------------
@pytest.mark.parametrize("encoding", [b"gzip", b"br", b"deflate", b"zstd", b"GZIP", b" gzip "])
def test_encoded_bodies_pass_unread_and_are_charged_the_reserved_output(encoding: bytes) -> None:
    body = gzip.compress(SSE_BODY)
    recorder, usage, mark = Recorder(), meter(hide=True, reserved=512), canary()
    headers = [*SSE, (b"content-encoding", encoding)]
    driver = ResponseDriver([recorder, usage, mark], 1 << 20)
    driver.start(200, headers)
    assert not driver.resizes, "content-length stays: the body is not changed"
    assert feed(driver, pieces(body, [10, 100])) == body
    asyncio.run(driver.finish(Ending.COMPLETED))
    assert recorder.events == [] and recorder.wholes == []
    assert recorder.other_bytes == len(body)
    assert usage.usage() == Usage(13, 512, reported=False)


def test_identity_encoding_is_read() -> None:
    recorder = Recorder()
    drive([recorder], 200, [*SSE, (b"Content-Encoding", b"identity")], SSE_BODY)
    assert len(recorder.events) == 5


def test_error_responses_pass_the_canary_untouched() -> None:
    body = json.dumps({"error": {"message": "often big"}}).encode()
    mark = canary()
    assert drive([mark], 429, JSON, body, [3]) == body
    assert mark.texts == {}
