"""The response path's shortcuts read exactly as the general code they stand for.

- ``SSEFramer`` cuts a stream whose line ends are all LF an event at a time (C-level
  ``find``) instead of line by line: the same events, for any body in any chunking, as
  the line-by-line reading (forced by saying the buffer may hold a CR), also when CRs
  appear later; and in linear time for one huge event.
- The canary writes a plain string as JSON without ``json.dumps``: the same bytes.
- The scanner's ``code_like`` and ``canonical`` (with shortcuts for the common chunk)
  say what they said before, for prose, code and odd unicode alike.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.canary.shapes import PROSE, canonical, code_like
from guardproxy.canary.stage import _quote
from guardproxy.response.sse import SSEFramer
from tests.streams import frame, pieces
from tests.test_fast_parse_differential import PROSE as PROSE_TEXT


def framed(parts: Sequence[bytes], general: bool) -> list[bytes]:
    """Every event ``parts`` make, then the rest flushed; ``general``: line by line."""
    framer = SSEFramer(1 << 20)
    out = []
    for part in parts:
        if general:
            framer.lf = False
        out += framer.feed(part)
    return [*out, framer.flush()]


_LINES = [b"data: x", b"data: {\"a\": 1}", b"event: e", b": ping", b"", b"", b"id: 1",
          b"data:", b"\xe2\x80\xa8 text"]


def body(rng: random.Random, eols: Sequence[bytes]) -> bytes:
    return b"".join(rng.choice(_LINES) + rng.choice(eols) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("eols", [[b"\n"], [b"\n", b"\r\n"], [b"\r", b"\n"], [b"\r\n"]])
def test_lf_framing_cuts_what_line_by_line_framing_cuts(eols: list[bytes]) -> None:
    rng = random.Random(str(eols))
    for _ in range(3000):
        data = body(rng, eols)
        if rng.random() < 0.3:   # LF first, other line ends only later
            data = body(rng, [b"\n"]) + data
        parts = pieces(data, [rng.randint(0, len(data)) for _ in range(rng.randint(0, 12))])
        fast = framed(parts, general=False)
        assert fast == framed(parts, general=True), data
        if b"\r" not in data:   # (a CR at the very end waits for the next read)
            blocks, rest = frame(data)
            assert fast == [*blocks, rest]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_LINES), max_size=30), st.lists(st.integers(0, 1 << 16),
                                                                max_size=20))
def test_lf_framing_for_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    parts = pieces(data, cuts)
    assert framed(parts, general=False) == framed(parts, general=True)


@pytest.mark.parametrize("line", [10 << 20, 7])
def test_one_huge_lf_event_is_framed_in_linear_time(line: int) -> None:
    """20 MiB of one event (long lines or many short ones) in 16 KiB reads, then its
    end: well under a second when each read is scanned once (rescanning what is held
    would take minutes)."""
    framer = SSEFramer(32 << 20)
    data = (b"data: " + b"x" * line + b"\n") * ((20 << 20) // (line + 7))
    started = time.process_time()
    for offset in range(0, len(data), 16 << 10):
        assert framer.feed(data[offset:offset + (16 << 10)]) == []
    assert framer.feed(b"\n") == [data + b"\n"]
    assert time.process_time() - started < 2.0


def test_quote_writes_what_json_dumps_writes() -> None:
    """The canary's ``_quote`` (a string as JSON, without json.dumps' cost when nothing
    needs escaping): every code point alone, and random strings of them."""
    for code in range(0x110000):
        for ascii_only in (False, True):
            assert _quote(chr(code), ascii_only) == json.dumps(chr(code), ensure_ascii=ascii_only)
    rng = random.Random(5)
    alphabet = [chr(i) for i in range(0x3000)] + ["\ud800", "\udfff", "😀", "\ufeff", "\u2028"]
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        for ascii_only in (False, True):
            assert _quote(text, ascii_only) == json.dumps(text, ensure_ascii=ascii_only)


# -- the scanner's chunk shapes, as they were written before the shortcuts -------------------
_CAMEL_REF = re.compile(r"[a-z][A-Z]|[A-Z]{2}[a-z]")
_DOTTED_REF = re.compile(r"[A-Za-z]\.[A-Za-z]")
_NOT_ALNUM_REF = re.compile(r"[\W_]+")


def code_like_reference(chunk: str, prose: re.Match[str] | bool | None = True) -> bool:
    if prose is True:
        prose = PROSE.fullmatch(chunk)
    if prose and not _CAMEL_REF.search(chunk):
        return False
    if any(c in "_(){}[]<>=/\\$#@|~^`%&+" for c in chunk) or "::" in chunk \
            or _CAMEL_REF.search(chunk):
        return True
    dotted = _DOTTED_REF.search(chunk)
    return dotted is not None and chunk.strip(".,;:!?()").lower() not in {
        "e.g", "i.e", "a.m", "p.m", "u.s", "u.k", "et.al", "ph.d"}


def test_chunk_shapes_read_as_before() -> None:
    rng = random.Random(9)
    alphabet = [*"abcXYZ019_.:()'\"*-é中İßǅ\u2019\u00a0", "::", "e.g", "www.", "I'"]
    words = [*PROSE_TEXT.split(), "fooBar", "HTTPServer", "e.g.", "obj.attr", "ns::x",
             "a_b", "İstanbul", "ǅemal", "ß", "123", "ÉTÉ", "x.Y"]
    for _ in range(100_000):
        chunk = rng.choice(words) if rng.random() < 0.4 else \
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
        assert code_like(chunk) == code_like_reference(chunk), chunk
        match = PROSE.fullmatch(chunk)
        assert code_like(chunk, match) == code_like_reference(chunk, match), chunk
        assert canonical(chunk) == (_NOT_ALNUM_REF.sub("", chunk.lower()) or "_"), chunk
