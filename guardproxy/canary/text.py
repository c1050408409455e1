"""Cutting prose into marking sites, identically for a stream and for a whole text.

The text is read as whitespace runs and chunks (runs of non-whitespace). A chunk is
only final once whitespace follows it, so a stream holds back at most its trailing
partial chunk: the same text gives the same sites however it was split. Nothing is ever
a site inside fenced or indented code, inline code, URLs or e-mail addresses, and words
with digits or inner punctuation are never touched.

A site's *context* is the two previous words in canonical form, where each word of the
lexicon stands for its pair: choosing either word of a pair (ours or an attacker's)
never changes the context of any other site. A pair whose words take different
articles is no site right after *a* or *an*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guardproxy.canary.keys import ZW_ONE, ZW_ZERO
from guardproxy.canary.lexicon import ARTICLE_SENSITIVE, INDEX

_PIECES = re.compile(r"\s+|\S+")
_WORD = re.compile(r"([^A-Za-z0-9]*?)([A-Za-z]+)([^A-Za-z0-9]*)")
_ZW = (ZW_ZERO, ZW_ONE)
_ARTICLES = frozenset({"a", "an"})
LOWER, TITLE, UPPER = 0, 1, 2


@dataclass(slots=True)
class Unit:
    text: str
    word_start: int = 0         # where the word core starts in text
    core: str = ""              # the word, when the chunk is a plain word
    context: bytes = b""        # left context + own canonical word (plain words only)
    pair: int = -1              # lexicon pair when the word is a marking site, else -1
    member: int = -1
    case: int = LOWER
    zw: str = ""                # zero-width characters the chunk carried


def _case(core: str) -> int | None:
    if core.islower():
        return LOWER
    if core[0].isupper() and (len(core) == 1 or core[1:].islower()):
        return TITLE
    if core.isupper():
        return UPPER
    return None


def apply_case(word: str, case: int) -> str:
    return word.capitalize() if case == TITLE else word.upper() if case == UPPER else word


class Scanner:
    def __init__(self) -> None:
        self.pending = ""
        self.history = ("^", "^")
        self.line_start = True
        self.indent = 0
        self.code_line = False
        self.in_fence = False
        self.in_inline = False

    def feed(self, text: str, final: bool = False) -> list[Unit]:
        buf = self.pending + text if self.pending else text
        self.pending = ""
        units = []
        end = len(buf)
        for match in _PIECES.finditer(buf):
            piece = match.group()
            if piece[0].isspace():
                self._whitespace(piece)
                units.append(Unit(piece))
            elif match.end() == end and not final:
                self.pending = piece  # may continue in the next delta
            else:
                units.append(self._chunk(piece))
        return units

    def _whitespace(self, run: str) -> None:
        newline = run.rfind("\n")
        if newline >= 0:
            self.line_start, self.code_line, self.in_inline = True, False, False
            self.indent = 0
            run = run[newline + 1:]
        if self.line_start:
            self.indent += run.count(" ") + 4 * run.count("\t")

    def _chunk(self, chunk: str) -> Unit:
        at_line_start, self.line_start = self.line_start, False
        if chunk.startswith(("```", "~~~")):  # a fence, or a code span of its own kind
            self.in_fence = not self.in_fence
            return Unit(chunk)
        if self.in_fence:
            return Unit(chunk)
        if at_line_start and self.indent >= 4:
            self.code_line = True
        if self.code_line:
            return Unit(chunk)
        ticks = chunk.count("`")
        if self.in_inline or ticks:
            if ticks % 2:
                self.in_inline = not self.in_inline
            return Unit(chunk)
        if "://" in chunk or chunk.startswith("www.") or "@" in chunk:
            return Unit(chunk)
        zw = ""
        clean = chunk
        if ZW_ZERO in chunk or ZW_ONE in chunk:
            zw = "".join(c for c in chunk if c in _ZW)
            clean = "".join(c for c in chunk if c not in _ZW)
        match = _WORD.fullmatch(clean)
        h0, h1 = self.history
        if match is None:
            self.history = (h1, "_")
            return Unit(chunk, zw=zw)
        core = match.group(2)
        lower = core.lower()
        entry = INDEX.get(lower)
        canon = f"#{entry[0]}" if entry else lower
        self.history = (h1, canon)
        unit = Unit(chunk, word_start=len(match.group(1)), core=core, zw=zw,
                    context=f"{h0}\x1f{h1}\x1f{canon}".encode())
        case = _case(core)
        # "a huge" must not become "a enormous": the article is left context, so this
        # is decided the same way when marking a stream and when detecting
        if entry is not None and case is not None and not (
                entry[0] in ARTICLE_SENSITIVE and h1 in _ARTICLES):
            unit.pair, unit.member, unit.case = entry[0], entry[1], case
        return unit

    def flush(self) -> list[Unit]:
        return self.feed("", final=True)
