"""Reading OpenAI ``chat.completion.chunk`` events without parsing them: *templates*.

The events of one chat stream differ only in their text, byte for byte:
``data: {"id":…,"choices":[{"index":0,"delta":{"content":"<text>"},…}]…}\\n\\n``.
The first event of such a layout is parsed in full (its parse is shared with the
stages as ever) and, when its shape is one this module can vouch for, kept as a
template: the bytes before the text's JSON string (``prefix``) and after it
(``suffix``). A later event that is ``prefix + <one JSON string token> + suffix``
parses, by the JSON grammar, exactly as the template with that string as the text —
so its text is decoded from the token alone (with json's own ``scanstring``) and
nothing else is read. Everything else (an odd shape, a different layout, anything in
doubt) reads as ``None``, and the caller parses the event as before.

A template is kept only when the event is one ``data:`` line ended by a blank line (so
it has no name), and its JSON is an object with no ``type`` (not the Responses API), no
``usage`` object, and one choice whose ``delta`` is an object with a string ``content``
and no ``tool_calls`` list; ``"content"`` occurs once in the bytes and there is no
backslash outside the text's string, so no other key can decode to ``content``
(``json.loads`` keeps a duplicate key's last value) and every other quote is a real
string boundary. What the stages read from the choice — its index, and whether it ends
(``finish_reason`` not null) — is taken from the template's parse: it cannot change
while the bytes around the text stay the same.

OpenAI adds an ``obfuscation`` string of random length to each chunk: when an event
matches a template up to the end of its text but not the rest, the template's suffix is
tried again with each string *value* after the text as a hole (any string without
escapes or control characters: the parse is the same but for that value, which no stage
reads from a chunk).

Cost: a template match is a ``startswith``, an ``endswith``, two ``find`` and a decode
(~1 µs for a 250-byte event, against ~4 µs for ``event_fields`` + ``json.loads``). A
response that keeps changing layout stops learning after a few templates that were
never used. Checked against ``json.loads`` in ``tests/test_fast_parse_differential.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # C: json.loads' own
from typing import Any

# one JSON string token exactly as json.loads reads it (strict: no control characters)
_TOKEN = re.compile(rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"')
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]*+')   # a hole: a string's inside without escapes
_CONTROL = re.compile("[\x00-\x1f]")
_KEY = b'"content":'
_MAX_TEMPLATES = 4     # several choices interleave (n > 1): one template each
_LEARN_FREE = 4        # templates learned before each must have paid for itself


@dataclass(frozen=True, slots=True)
class Template:
    prefix: bytes                  # up to and including ``"content":``
    suffix: bytes                  # after the text's string, to the blank line
    index: int                     # the choice's index as the stages read it (0 if not an int)
    finished: bool                 # its finish_reason is not null
    holes: tuple[bytes, ...] | None = None  # the suffix cut at its string values' insides


class ChatChunk:
    """What a stage reads from one chat chunk: ``source[start:end]`` is the JSON string
    of ``choices[0].delta.content`` (quotes included), decoded as ``content``; ``plain``:
    that string has no escape (so it is ``"`` + the UTF-8 of the text + ``"``, as
    ``json.dumps(content, ensure_ascii=False)`` writes it); ``index`` and ``finished`` as
    in ``Template``. (A plain class: one is made per event.)"""

    __slots__ = ("content", "end", "finished", "index", "plain", "source", "start")

    def __init__(self, source: bytes, start: int, end: int, content: str, plain: bool,
                 index: int, finished: bool) -> None:
        self.source, self.start, self.end = source, start, end
        self.content, self.plain, self.index, self.finished = content, plain, index, finished


class ChunkReader:
    """One response's templates (see the module doc). Not shared between responses."""

    __slots__ = ("hits", "learned", "templates")

    def __init__(self) -> None:
        self.templates: list[Template] = []
        self.learned = 0
        self.hits = 0

    @property
    def learning(self) -> bool:
        """Whether an event no template matches is worth a look (after its parse)."""
        return self.learned < _LEARN_FREE or self.hits >= 2 * self.learned

    def read(self, block: bytes) -> ChatChunk | None:
        """The chunk ``block`` is, when a template matches it exactly; else None."""
        for template in self.templates:
            prefix = template.prefix
            if not block.startswith(prefix):
                continue
            start = len(prefix)
            suffix = template.suffix
            end = len(block) - len(suffix)
            if end - start >= 2 and block.endswith(suffix) and block[start] == block[end - 1] \
                    == 0x22 and block.find(b'"', start + 1, end - 1) < 0 \
                    and block.find(b"\\", start + 1, end - 1) < 0:
                # the common text: a string without escapes between the two (no regex)
                try:
                    content = block[start + 1:end - 1].decode()
                except UnicodeDecodeError:
                    return None
                if not content.isprintable() and _CONTROL.search(content):
                    return None   # a raw control character: json.loads refuses it
                self.hits += 1
                return ChatChunk(block, start, end, content, True, template.index,
                                 template.finished)
            token = _TOKEN.match(block, start)
            if token is None:
                return None
            end = token.end()
            if not (len(block) - len(suffix) == end and block.endswith(suffix)) \
                    and not _holes_match(block, end, _holes(template, self.templates)):
                continue
            plain = block.find(b"\\", start, end) < 0
            if plain:   # the common text: no escapes
                try:
                    content = block[start + 1:end - 1].decode()
                except UnicodeDecodeError:
                    return None
            else:
                decoded = _decode(block, start, end)
                if decoded is None:
                    return None
                content = decoded
            self.hits += 1
            return ChatChunk(block, start, end, content, plain, template.index,
                             template.finished)
        return None

    def learn(self, block: bytes, obj: Any) -> ChatChunk | None:
        """Keep ``block`` (whose data parsed as ``obj``) as a template when its shape
        allows (see the module doc); the chunk it is, or None."""
        if not (block.startswith(b"data:") and block.endswith(b"\n\n")
                and block.count(b"\n") == 2 and b"\r" not in block):
            return None
        choice = _chat_choice(obj)
        if choice is None or block.count(b'"content"') != 1:
            return None
        at = block.find(_KEY)
        if at < 0:
            return None
        start = at + len(_KEY)
        token = _TOKEN.match(block, start)
        if token is None:
            return None
        end = token.end()
        if block.find(b"\\", 0, start) >= 0 or block.find(b"\\", end) >= 0:
            return None
        content = _decode(block, start, end)
        if content is None or content != choice["delta"]["content"]:
            return None   # cannot happen for valid JSON: any doubt reads as no chunk
        index = choice.get("index")
        template = Template(block[:start], block[end:], index if isinstance(index, int) else 0,
                            choice.get("finish_reason") is not None)
        self.templates.insert(0, template)
        del self.templates[_MAX_TEMPLATES:]
        self.learned += 1
        return ChatChunk(block, start, end, content, block.find(b"\\", start, end) < 0,
                         template.index, template.finished)


def _chat_choice(obj: Any) -> dict[str, Any] | None:
    """The one choice of a chat chunk in the shape templates allow, else None."""
    if not isinstance(obj, dict) or "type" in obj or isinstance(obj.get("usage"), dict):
        return None
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict) or not isinstance(delta.get("content"), str) \
            or isinstance(delta.get("tool_calls"), list):
        return None
    return choice


def _decode(block: bytes, start: int, end: int) -> str | None:
    """The string a JSON string token decodes to, as json.loads decodes it; None when
    the bytes are not valid UTF-8 (json.loads would see replacement characters)."""
    try:
        if block.find(b"\\", start, end) < 0:
            return block[start + 1:end - 1].decode()
        text: str = scanstring(block[start:end].decode(), 1)[0]
        return text
    except (UnicodeDecodeError, ValueError):
        return None


def _holes(template: Template, templates: list[Template]) -> tuple[bytes, ...]:
    """The template's suffix cut at the inside of every string value (computed once)."""
    if template.holes is not None:
        return template.holes
    suffix, pieces, pos, cut = template.suffix, [], 0, 0
    while (opening := suffix.find(b'"', pos)) >= 0:
        closing = suffix.find(b'"', opening + 1)   # no backslash: every quote is a boundary
        if closing < 0:
            break
        if not suffix[closing + 1:].lstrip(b" \t").startswith(b":"):   # a value, not a key
            pieces.append(suffix[cut:opening + 1])
            cut = closing
        pos = closing + 1
    pieces.append(suffix[cut:])
    holes = tuple(pieces)
    at = templates.index(template)
    templates[at] = Template(template.prefix, template.suffix, template.index,
                             template.finished, holes)
    return holes


def _holes_match(block: bytes, pos: int, pieces: tuple[bytes, ...]) -> bool:
    """Whether ``block[pos:]`` is ``pieces`` with a string's plain inside between each."""
    if len(pieces) < 2:
        return False
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        if not block.startswith(piece, pos):
            return False
        pos += len(piece)
        if i < last:
            inside = _PLAIN.match(block, pos)
            assert inside is not None   # the pattern matches the empty string
            pos = inside.end()
    return pos == len(block)
