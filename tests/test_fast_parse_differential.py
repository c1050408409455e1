"""Differential: the strict chat-chunk reader against ``json.loads``.

``guardproxy.response.chat_chunk`` reads an OpenAI ``chat.completion.chunk`` event
without parsing it, when it has the layout of an event it already parsed in the same
response (a *template*). Whatever it says must be exactly what the stages would read
from ``json.loads`` of the event's data (as ``SSEEvent.json`` parses it): every event
of a large generated corpus goes through a reader, as a stream would feed it, and every
answer it gives is checked against the full parse — the text, its choice index, whether
the choice finishes, the byte span of the text's JSON string (a string spliced there
parses as the text, nothing else changes) and the other fields a carrier copies. The
corpus mixes what vLLM, OpenAI, llama.cpp, SGLang, TGI and Ollama write with hostile
shapes: duplicate keys (``json.loads`` keeps the last), escaped and spaced keys, unicode
escapes and surrogate pairs (lone ones too), ``"content": null``, quotes and backslashes
in the text, ``usage`` in a key name or a string, several choices, odd indexes, invalid
UTF-8, control characters, odd SSE framing.

The generator (``chat_stream``, ``hostile_block``) is shared with
``test_fast_response_differential``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guardproxy.dialects import get_dialect
from guardproxy.response.chat_chunk import ChatChunk, ChunkReader
from guardproxy.response.events import SSEEvent
from guardproxy.response.sse import event_fields
from guardproxy.response.usage import Tally

PROSE = (Path(__file__).parent / "data" / "prose.txt").read_text()
_WORDS = PROSE.split()
_ODD = ("é", "中", "😀", "👍🏽", "\u2028", "\u0085", "\u00a0", "\u200b", '"', "\\", "/",
        "\n", "\t", "\r", "\x00", "\x1f", "\x7f", "\ud800", "\udc00", "usage", '"usage"',
        '"usage":null', '"content":"x"', '\\"content\\":', "data: ", "}]}", "\r\n",
        "'", "\u2019", "don't", "*often*", "- ", "`x`", "[DONE]", "\ufffd")


# -- JSON writing with full control (duplicate keys, escapes, whitespace) -------------
class Obj(list[tuple[Any, Any]]):
    """A JSON object as (key, value) pairs: duplicates and order kept as written."""


class Raw(bytes):
    """Bytes written as they are (a number spelled oddly, a broken token)."""


class Str:
    """A string written in an escape style: utf8, ascii, upper, slash, allu, mixed."""

    def __init__(self, value: str, mode: str = "utf8") -> None:
        self.value, self.mode = value, mode


def _escape_all(value: str, upper: bool) -> str:
    out = []
    for ch in value:
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            pair = (0xD800 | code >> 10, 0xDC00 | code & 0x3FF)
            out += [f"\\u{p:04X}" if upper else f"\\u{p:04x}" for p in pair]
        else:
            out.append(f"\\u{code:04X}" if upper else f"\\u{code:04x}")
    return "".join(out)


def string_bytes(value: str, mode: str, rng: random.Random | None = None) -> bytes:
    if mode == "ascii":
        text = json.dumps(value)
    elif mode == "upper":
        text = re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(),
                      json.dumps(value))
    elif mode == "slash":
        text = json.dumps(value, ensure_ascii=False).replace("/", "\\/")
    elif mode == "allu":
        text = '"' + _escape_all(value, upper=False) + '"'
    elif mode == "mixed":
        assert rng is not None
        parts = []
        for ch in value:
            if rng.random() < 0.3:
                parts.append(_escape_all(ch, upper=rng.random() < 0.5))
            else:
                parts.append(json.dumps(ch, ensure_ascii=False)[1:-1])
        text = '"' + "".join(parts) + '"'
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8


def emit(node: Any, style: str, rng: random.Random) -> bytes:
    """JSON bytes; ``style``: compact, spaced (json.dumps' default) or odd whitespace."""
    def ws() -> bytes:
        if style == "compact":
            return b""
        if style == "spaced":
            return b" "
        return rng.choice([b"", b"", b" ", b"  ", b"\t", b" \t "])

    def sep(mark: bytes) -> bytes:
        if style == "compact":
            return mark
        if style == "spaced":
            return mark + b" "
        return ws() + mark + ws()

    if isinstance(node, Raw):
        return bytes(node)
    if isinstance(node, Str):
        return string_bytes(node.value, node.mode, rng)
    if isinstance(node, Obj):
        items = [(k if isinstance(k, (Raw, Str)) else Str(k)) for k, _ in node]
        parts = [emit(k, style, rng) + sep(b":") + emit(v, style, rng)
                 for k, (_, v) in zip(items, node, strict=True)]
        return b"{" + ws() + sep(b",").join(parts) + ws() + b"}"
    if isinstance(node, list):
        return b"[" + sep(b",").join(emit(v, style, rng) for v in node) + b"]"
    if isinstance(node, str):
        return string_bytes(node, "utf8")
    return json.dumps(node).encode()


# -- chunk shapes ------------------------------------------------------------------------
LAYOUTS = ("openai", "vllm", "llamacpp", "sglang", "tgi", "ollama")


def chat_chunk(layout: str, content: Any, *, index: Any = 0, finish: Any = None,
               usage: Any = "absent", role: bool = False, stamp: int = 1732960000,
               ident: str = "chatcmpl-AbC123xyz") -> Obj:
    """One chunk as ``layout``'s server writes it (``content`` "absent": no key)."""
    delta = Obj()
    if layout == "sglang":
        delta += [("role", "assistant" if role else None), ("content", content),
                  ("reasoning_content", None), ("tool_calls", None)]
    else:
        if role:
            delta.append(("role", "assistant"))
        if content != "absent":
            delta.append(("content", content))
        if role and layout == "openai":
            delta.append(("refusal", None))
    if layout == "llamacpp":
        choice = Obj([("finish_reason", finish), ("index", index), ("delta", delta)])
        top = Obj([("choices", [choice]), ("created", stamp), ("id", ident),
                   ("model", "qwen2.5-7b-instruct-q4_k_m.gguf"),
                   ("system_fingerprint", "b4514-a4090d11"),
                   ("object", "chat.completion.chunk")])
    else:
        choice = Obj([("index", index), ("delta", delta)])
        if layout != "ollama":
            choice.append(("logprobs", None))
        choice.append(("finish_reason", finish))
        if layout == "vllm":
            choice.append(("stop_reason", None))
        if layout == "sglang":
            choice.append(("matched_stop", None))
        head: list[tuple[Any, Any]] = [("id", "" if layout == "tgi" else ident),
                                       ("object", "chat.completion.chunk"),
                                       ("created", stamp), ("model", "m/Model-7B")]
        if layout == "tgi":
            head = [head[1], head[0], *head[2:]]
        if layout in ("openai", "tgi", "ollama"):
            head.append(("system_fingerprint", "fp_0ba0d124f1"))
        top = Obj([*head, ("choices", [choice])])
    if usage != "absent":
        top.append(("usage", usage))
    return top


def _text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.7:
        start = rng.randrange(len(_WORDS))
        words = _WORDS[start:start + rng.randint(1, 3)]
        return (" " if rng.random() < 0.8 else "") + " ".join(words)
    if roll < 0.95:
        return "".join(rng.choice(_ODD + tuple(_WORDS[:30])) for _ in range(rng.randint(1, 4)))
    return ""


def _choice(top: Obj) -> Obj:
    """The first choice (a dummy when a mutation already broke the shape)."""
    choices = dict(top).get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Obj):
        return choices[0]
    return Obj()


def _delta(top: Obj) -> Obj:
    delta = dict(_choice(top)).get("delta")
    return delta if isinstance(delta, Obj) else Obj()


_USAGE = Obj([("prompt_tokens", 31), ("completion_tokens", 412), ("total_tokens", 443)])


def _mutations() -> list[Callable[[random.Random, Obj], None]]:
    """Hostile edits of a chunk: each makes a shape a lenient reader could misread."""
    def dup_content(rng: random.Random, top: Obj) -> None:
        delta = _delta(top)
        other = rng.choice([_text(rng), None, 5, "", Str(_text(rng), "ascii")])
        delta.insert(rng.randint(0, len(delta)), ("content", other))

    def dup_choices(rng: random.Random, top: Obj) -> None:
        other = rng.choice([None, [], [Obj([("index", 0), ("delta", Obj([("content", "x")]))])]])
        top.insert(rng.randint(0, len(top)), ("choices", other))

    def dup_delta(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice.insert(rng.randint(0, len(choice)), ("delta", rng.choice(
            [None, Obj(), Obj([("content", "other")])])))

    def dup_index(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice.insert(rng.randint(0, len(choice)), ("index", rng.choice([0, 1, 2])))

    def dup_finish(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice.insert(rng.randint(0, len(choice)), ("finish_reason", rng.choice([None, "stop"])))

    def usage_object(rng: random.Random, top: Obj) -> None:
        top.insert(rng.randint(0, len(top)), ("usage", rng.choice([_USAGE, None, 3, "x"])))

    def usage_twice(rng: random.Random, top: Obj) -> None:
        pair = [("usage", None), ("usage", _USAGE)]
        rng.shuffle(pair)
        top += pair

    def usage_in_names(rng: random.Random, top: Obj) -> None:
        top.insert(rng.randint(0, len(top)), rng.choice([
            ("usage_stats", None), ("x_usage", _USAGE), ("model", "usage"),
            ("note", '"usage":{"completion_tokens":9}'), ("usage ", _USAGE)]))

    def typed(rng: random.Random, top: Obj) -> None:
        top.insert(rng.randint(0, len(top)), ("type", rng.choice(
            ["response.output_text.delta", "chat", None, "response."])))

    def several_choices(rng: random.Random, top: Obj) -> None:
        choices = dict(top).get("choices")
        if not isinstance(choices, list):
            return
        choices.append(Obj([("index", 1), ("delta", Obj([("content", _text(rng))])),
                            ("finish_reason", None)]))
        if rng.random() < 0.5:
            choices.reverse()

    def odd_index(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice[:] = [(k, v) for k, v in choice if k != "index"]
        if rng.random() < 0.9:
            choice.insert(0, ("index", rng.choice(
                [1, 3, 7, 12, -1, True, False, "0", 0.0, Raw(b"1e0"), Raw(b"-0"),
                 Raw(b"00"), 10 ** 30, None])))

    def odd_content(rng: random.Random, top: Obj) -> None:
        delta = _delta(top)
        delta[:] = [(k, v) for k, v in delta if k != "content"]
        value: Any = rng.choice([None, 5, True, [], Obj([("a", 1)]), "", Raw(b'"\\x"'),
                            Raw(b'"\\u12"'), Raw(b'"a\x01b"'), Raw(b'"\xff\xfe"'),
                            Raw(b'"\xe2\x80"'), Raw(b'"tab\there"'), Raw(b'"\\ud83d\\ude00"'),
                            Raw(b'"\\uD83D\\uDE00 ok"'), Raw(b'"lone \\ud800"'),
                            Raw(b'"\\udc00\\ud800"'), Raw(b'"a\\/b"'), Raw(b'"\\"quoted\\""'),
                            Raw(b'"ends \\\\"'), Raw(b'"x"  ')])
        if rng.random() < 0.8:
            delta.insert(rng.randint(0, len(delta)), ("content", value))

    def odd_delta(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice[:] = [(k, v) for k, v in choice if k != "delta"]
        choice.append(("delta", rng.choice([None, [], "x", Obj()])))
        if rng.random() < 0.5:
            choice.append(("text", _text(rng)))

    def tool_calls(rng: random.Random, top: Obj) -> None:
        _delta(top).append(("tool_calls", rng.choice([None, [Obj([
            ("index", 0), ("id", "call_1"), ("type", "function"),
            ("function", Obj([("name", "f"), ("arguments", '{"content": "often"}')]))])]])))

    def escaped_key(rng: random.Random, top: Obj) -> None:
        delta = _delta(top)
        key = rng.choice([Raw(b'"conte\\u006et"'), Raw(b'"\\u0063ontent"'),
                          Raw(b'"content\\u0000"'), Raw(b'"con\\/tent"')])
        delta.insert(rng.randint(0, len(delta)), (key, _text(rng)))

    def spaced_key(rng: random.Random, top: Obj) -> None:
        delta = _delta(top)
        delta.insert(rng.randint(0, len(delta)), (Raw(b'"content" '), _text(rng)))

    def content_elsewhere(rng: random.Random, top: Obj) -> None:
        top.insert(rng.randint(0, len(top)), rng.choice([
            ("model", "content"), ("content", _text(rng)), ("content", None),
            ("x", '"content":"y"'), ("id", 'a\\"content\\":"'), ("content_filter", None)]))

    def escape_elsewhere(rng: random.Random, top: Obj) -> None:
        top.insert(rng.randint(0, len(top)), rng.choice([
            ("id", Str("chat\u00e9", "ascii")), ("model", "a/b"), ("model", Str("a/b", "slash")),
            ("x", '"quoted"')]))

    def odd_numbers(rng: random.Random, top: Obj) -> None:
        top[:] = [(k, v) for k, v in top if k != "created"]
        top.insert(rng.randint(0, len(top)), ("created", rng.choice([
            Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"1e400"), Raw(b"01"),
            Raw(b"1."), Raw(b".5"), Raw(b"1" * 5000), Raw(b"-"), 1.5, -3, Raw(b"2E+3")])))

    def logprobs(rng: random.Random, top: Obj) -> None:
        choice = _choice(top)
        choice[:] = [(k, v) for k, v in choice if k != "logprobs"]
        choice.append(("logprobs", Obj([("content", [Obj([("token", "x"), ("logprob", -0.1)])])])))

    def nested(rng: random.Random, top: Obj) -> None:
        top.append(("meta", Obj([("content", _text(rng)), ("choices", [])])))

    return [dup_content, dup_choices, dup_delta, dup_index, dup_finish, usage_object,
            usage_twice, usage_in_names, typed, several_choices, odd_index, odd_content,
            odd_delta, tool_calls, escaped_key, spaced_key, content_elsewhere,
            escape_elsewhere, odd_numbers, logprobs, nested]


MUTATIONS = _mutations()
MODES = ("utf8", "utf8", "utf8", "ascii", "upper", "slash", "allu", "mixed")


def frame_event(data: bytes, rng: random.Random, odd: float) -> bytes:
    """``data`` as an SSE event: ``data: x\\n\\n`` mostly, else an odd framing."""
    if rng.random() >= odd:
        return b"data: " + data + b"\n\n"
    kind = rng.randrange(9)
    if kind == 0:
        return b"data:" + data + b"\n\n"
    if kind == 1:
        return b"data:  " + data + b"\n\n"
    if kind == 2:
        return b"data: " + data + b"\r\n\r\n"
    if kind == 3:
        return b"event: " + rng.choice([b"message", b"response.output_text.delta", b""]) \
            + b"\ndata: " + data + b"\n\n"
    if kind == 4:
        return b": ping\ndata: " + data + b"\n\n"
    if kind == 5:
        return b"id: 7\ndata: " + data + b"\n\n"
    if kind == 6:
        cut = rng.randint(0, len(data))
        return b"data: " + data[:cut] + b"\ndata: " + data[cut:] + b"\n\n"
    if kind == 7:
        return b"data: " + data + b" \n\n"
    return b"data: " + data + b"\r\r"


def chunk_data(rng: random.Random, layout: str, content: Any, hostile: float,
               style: str, **fields: Any) -> bytes:
    top = chat_chunk(layout, content, **fields)
    if rng.random() < hostile:
        for mutate in rng.sample(MUTATIONS, rng.choice([1, 1, 1, 2, 3])):
            mutate(rng, top)
    data = emit(top, style, rng)
    if rng.random() < hostile * 0.1:
        data = rng.choice([data[:-1], data + b"}", data + b" x", data[:len(data) // 2],
                           b"[" + data + b"]", data.replace(b"{", b"[", 1)])
    return data


def hostile_block(rng: random.Random, layout: str | None = None) -> bytes:
    """One event, hostile about half the time."""
    layout = layout or rng.choice(LAYOUTS)
    mode = rng.choice(MODES)
    content: Any = Str(_text(rng), mode)
    style = rng.choice(["compact"] * 6 + ["spaced", "odd"])
    data = chunk_data(rng, layout, content, 0.5, style, index=rng.choice([0, 0, 0, 1]),
                      finish=rng.choice([None, None, None, "stop"]),
                      usage=rng.choice(["absent", "absent", None]))
    return frame_event(data, rng, 0.1)


def chat_stream(rng: random.Random, hostile: float = 0.05) -> list[bytes]:
    """A chat completion stream's events as one server writes them: a role chunk, text
    chunks (one or two choices), the end (with the last text or after it), maybe usage
    and ``[DONE]``; ``hostile`` of the text chunks are hostile shapes."""
    layout = rng.choice(LAYOUTS)
    mode = rng.choice(MODES)
    style = rng.choice(["compact"] * 8 + ["spaced", "odd"])
    usage = rng.choice(["absent", None, "continuous"])
    choices = rng.choice([1, 1, 1, 2])
    merged = rng.random() < 0.5
    stamp, ident = rng.randrange(10 ** 9, 2 * 10 ** 9), f"chatcmpl-{rng.randrange(10 ** 6)}"
    queues: list[list[tuple[Any, Any, bool]]] = []
    for _ in range(choices):
        texts: list[tuple[Any, Any, bool]] = [("" if layout != "ollama" else "absent", None, True)]
        for _ in range(rng.randint(0, 40)):
            texts.append((Str(_text(rng), mode), None, False))
        if merged and len(texts) > 1:
            texts[-1] = (texts[-1][0], "stop", False)
        else:
            texts.append(("absent" if layout != "sglang" else None, "stop", False))
        queues.append([(t, f, r) for t, f, r in texts])
    events: list[bytes] = []
    n = 0
    while any(queues):
        live = [i for i, q in enumerate(queues) if q]
        index = rng.choice(live)
        content, finish, role = queues[index].pop(0)
        n += 1
        chunk_usage: Any = usage
        if usage == "continuous":
            chunk_usage = Obj([("prompt_tokens", 7), ("completion_tokens", n),
                               ("total_tokens", n + 7)])
        data = chunk_data(rng, layout, content, hostile, style, index=index, finish=finish,
                          usage=chunk_usage, role=role, stamp=stamp, ident=ident)
        events.append(frame_event(data, rng, hostile))
        if rng.random() < 0.03:
            events.append(b": ping\n\n")
    if usage is None or rng.random() < 0.6:
        top = chat_chunk(layout, "absent", usage=_USAGE, stamp=stamp, ident=ident)
        dict(top)["choices"].clear()
        events.append(frame_event(emit(top, style, rng), rng, 0.0))
    if rng.random() < 0.8:
        events.append(b"data: [DONE]\n\n")
    return events


# -- the reference: what the stages read from the full parse ------------------------------

OPENAI = get_dialect("openai")
PROBES = ("", "x", 'a "quoted" \\ back/slash', "é中😀\u2028\n\t\x00", "often usage")


def reference(block: bytes) -> tuple[str, Any]:
    """(name, parse) as ``SSEEvent`` reads them; the parse None when unreadable."""
    name, data = event_fields(block)
    try:
        return name, json.loads(data) if data and data != "[DONE]" else None
    except (ValueError, RecursionError):
        return name, None


def tally_of(read: Callable[[Tally], Any]) -> tuple[Any, ...]:
    tally = Tally()
    try:
        result = read(tally)
    except Exception as exc:  # the same failure is the same reading
        result = type(exc).__name__
    return (result, *(getattr(tally, slot) for slot in Tally.__slots__))


def check_chunk(block: bytes, chunk: ChatChunk) -> None:
    """Everything a stage may take from ``chunk`` is what the full parse says."""
    name, obj = reference(block)
    assert name == "" and isinstance(obj, dict), block
    assert "type" not in obj and not isinstance(obj.get("usage"), dict)
    choices = obj["choices"]
    assert isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict)
    choice = choices[0]
    delta = choice["delta"]
    assert isinstance(delta, dict) and not isinstance(delta.get("tool_calls"), list)
    assert type(delta.get("content")) is str and delta["content"] == chunk.content, block
    index = choice.get("index")
    index = index if isinstance(index, int) else 0
    assert chunk.index == index and type(chunk.index) is type(index), block
    assert chunk.finished == (choice.get("finish_reason") is not None), block
    assert chunk.source is block
    token = block[chunk.start:chunk.end]
    assert chunk.plain == (b"\\" not in token)
    if chunk.plain:   # what the canary takes for granted: json.dumps writes it so
        assert token == json.dumps(chunk.content, ensure_ascii=False).encode()
    # the text's string, where the canary swaps it: found once, as _swap looks for it
    assert block[chunk.start - 10:chunk.start] == b'"content":'
    assert block.count(b'"content":' + token) == 1
    for probe in PROBES:   # any string there reads as that text, and nothing else changes
        spliced = block[:chunk.start] + json.dumps(probe, ensure_ascii=False).encode() \
            + block[chunk.end:]
        want = json.loads(json.dumps(obj))
        want["choices"][0]["delta"]["content"] = probe
        assert json.dumps(reference(spliced)[1]) == json.dumps(want)
    # the usage meter reads the same from the chunk as from the parse
    assert tally_of(lambda t: OPENAI.read_chunk(chunk, t)) == \
        tally_of(lambda t: OPENAI.read_event(name, obj, t))


def read_stream(blocks: list[bytes]) -> tuple[int, int]:
    """Every block through one reader as the driver makes events of them, each chunk
    checked; (events, chunks read)."""
    reader = ChunkReader()
    read = 0
    for block in blocks:
        chunk = SSEEvent(block, True, reader).chunk
        if chunk is not None:
            check_chunk(block, chunk)
            read += 1
    return len(blocks), read


def test_streams_read_as_json_loads_reads_them() -> None:
    rng = random.Random(2024)
    events = read = 0
    for _ in range(400):
        n, r = read_stream(chat_stream(rng, hostile=rng.choice([0.0, 0.05, 0.3])))
        events, read = events + n, read + r
    assert read > events // 3, "the reader must read most realistic chunks"


def test_hostile_events_read_as_json_loads_reads_them() -> None:
    """Hostile events after a template of their own layout (so that most share its
    prefix), and after each other."""
    rng = random.Random(7)
    read = 0
    for _ in range(1500):
        layout = rng.choice(LAYOUTS)
        plain = [frame_event(chunk_data(rng, layout, Str(_text(rng)), 0.0, "compact"), rng, 0)
                 for _ in range(2)]
        read += read_stream([*plain, *(hostile_block(rng, layout) for _ in range(8))])[1]
    assert read > 1500


def template_and(layout: str, *tails: bytes) -> list[bytes]:
    """A template event of ``layout`` and events that share its prefix, ``tails`` after it."""
    first = b"data: " + emit(chat_chunk(layout, "It is"), "compact", random.Random(0)) + b"\n\n"
    cut = first.index(b'"content":') + 10
    return [first, *(first[:cut] + tail for tail in tails)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_that_share_the_prefix_are_read_exactly(layout: str) -> None:
    rest = template_and(layout, b'"x"}]}\n\n')[0]
    suffix = rest[rest.index(b'"It is"') + 7:]
    tails = [
        b'"plain"' + suffix,
        b'"a \\"usage\\" b"' + suffix,                      # usage inside the text
        b'"\\ud83d\\ude00 \\u00e9\\u00E9\\/\\n\\\\"' + suffix,  # escapes, surrogate pair
        b'"lone \\ud800"' + suffix,                         # a lone surrogate
        b'"\\udc00\\ud800"' + suffix,                       # a reversed pair
        b'"raw \xed\xa0\x80"' + suffix,                     # a surrogate as invalid UTF-8
        b'"bad \xff"' + suffix,                             # invalid UTF-8
        b'"tab\there"' + suffix,                            # a raw control character
        b'"\\x"' + suffix,                                  # an invalid escape
        b'"\\u12"' + suffix,                                # a short escape
        b'null' + suffix,                                   # "content": null
        b'"a","content":"b"' + suffix,                      # a duplicate: json keeps "b"
        b'"a","conte\\u006et":"b"' + suffix,                # the same, escaped
        b'"a","content" :"b"' + suffix,                     # the same, spaced
        b'"a" ,"content":"b"' + suffix,
        b'"a"' + suffix.replace(b"null", b'"stop"', 1),     # a finish_reason now
        b'"a"' + suffix[:-2] + b' \n\n',                    # trailing space
        b'"a"' + suffix[:-3] + b',"usage":{"completion_tokens":9}}\n\n',
        b'"a"' + suffix[:-3] + b',"choices":null}\n\n',     # a later duplicate wins
        b'"a"' + suffix[:-3] + b',"type":"response.output_text.delta"}\n\n',
        b'"a"' + suffix + b"data: more\n\n",
        b'"a"' + suffix[:-2] + b"\r\n\r\n",
        b'"a\nb"' + suffix,                                 # a line break in the text
        b'"a"' + suffix[:-1],                               # unterminated
    ]
    blocks = template_and(layout, *tails)
    reader = ChunkReader()
    chunks = [SSEEvent(block, True, reader).chunk for block in blocks]
    for block, chunk in zip(blocks, chunks, strict=True):
        if chunk is not None:
            check_chunk(block, chunk)
    got = {tail: chunk is not None for tail, chunk in zip(tails, chunks[1:], strict=True)}
    assert chunks[0] is not None and got[tails[0]] and got[tails[1]] and got[tails[2]]
    assert got[tails[3]] and got[tails[4]]   # lone surrogates decode as json.loads does
    assert not any(got[t] for t in tails[5:15]), "anything odd is parsed in full"


def test_a_volatile_string_after_the_text_is_a_hole() -> None:
    """OpenAI's ``obfuscation``: a random string in every chunk."""
    def chunk(text: str, pad: str) -> bytes:
        top = chat_chunk("openai", text, usage=None)
        top.append(("obfuscation", pad))
        return b"data: " + emit(top, "compact", random.Random(0)) + b"\n\n"

    blocks = [chunk("It", "a1"), *(chunk(f" w{i}", "x" * i) for i in range(6)),
              chunk("x", 'q"'), chunk("x", "\\"), chunk("x", "\x01")]
    reader = ChunkReader()
    chunks = [SSEEvent(block, True, reader).chunk for block in blocks]
    for block, read in zip(blocks, chunks, strict=True):
        if read is not None:
            check_chunk(block, read)
    assert all(c is not None for c in chunks[:7])
    assert reader.learned <= 2


def test_a_chunk_is_not_read_once_a_stage_holds_the_parse() -> None:
    reader = ChunkReader()
    blocks = template_and("vllm", b'"x"},"logprobs":null,"finish_reason":null,'
                          b'"stop_reason":null}]}\n\n')
    assert SSEEvent(blocks[0], True, reader).chunk is not None
    event = SSEEvent(blocks[1], True, reader)
    event.json["choices"][0]["delta"]["content"] = "changed"
    assert event.chunk is None
    event = SSEEvent(blocks[1], True, reader)
    assert event.chunk is not None and event.chunk.content == "x"
    assert SSEEvent(blocks[1], True, None).chunk is None   # no reader: never


def test_the_reader_stops_learning_layouts_it_never_reads() -> None:
    """Each event a new layout (a changing field before the text): the reader gives up
    after a few templates."""
    reader = ChunkReader()
    for i in range(40):
        block = b"data: " + emit(chat_chunk("vllm", "x", stamp=i), "compact",
                                 random.Random(0)) + b"\n\n"
        assert SSEEvent(block, True, reader).chunk is not None or reader.learned >= 4
    assert reader.learned < 10
