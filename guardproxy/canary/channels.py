"""The mark channels: where each may write, and the two variants it chooses between.

- ``lexical``: a word of an interchangeable pair (``lexicon``), in lower case, or
  capitalised where a sentence starts.
- ``typography``: an apostrophe inside a word, straight (U+0027) or curly (U+2019).
  A reader does not tell them apart; Unicode normalisation (NFC/NFKC) keeps both, while
  pipelines that "uncurl" quotes (ftfy) or re-typing remove it.
- ``markdown``: choices that CommonMark renders identically: ``*`` or ``_`` around
  one-chunk emphasis (``**word**`` / ``__word__``; an underscore never starts a slot,
  so ``__init__`` is never touched), ``-`` or ``*`` list bullets, ``1.`` or ``1)``
  list numbers. A list's first item decides for the whole list (a new bullet character
  would start a new list); later items follow it. Markdown rendering removes it.

Each slot with a choice of its own is keyed by its left context like the lexical one,
with the channel's name in the context so channels never share a site.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from guardproxy.canary import contractions
from guardproxy.canary.lexicon import ARTICLE_SENSITIVE, INDEX, PAIRS
from guardproxy.canary.shapes import BULLETS, ORDERED
from guardproxy.canary.slots import LEXICAL, MARKDOWN, TYPOGRAPHY, Slot, Unit

_ARTICLES = frozenset({"a", "an"})
_DETERMINED = frozenset({"a", "an", "the", "this", "that", "every", "no", "such"})
_APOSTROPHES = ("'", "\u2019")


@dataclass(slots=True)
class _List:
    kind: str       # "bullet" | "ordered" | "plus"
    member: int     # the variant its items have in the text
    ident: int      # the leader slot


class Channels:
    """Slot makers for one text; keeps the open lists and the slot counter."""

    def __init__(self) -> None:
        self.lists: dict[int, _List] = {}   # by level: the column its items hang from
        self.levels: list[list[int]] = []   # open levels: [base column, content column]
        self.idents = 0
        self.apostrophe = "'"               # the style the text last used
        self.style = self.ident()           # the paragraph's apostrophe style group
        self.styled = False                 # whether it has its leading apostrophe
        self.em_style = self.ident()        # and its emphasis style group
        self.em_styled = False

    def ident(self) -> int:
        self.idents += 1
        return self.idents

    def end_lists(self) -> None:
        self.lists.clear()
        self.levels.clear()

    def _level(self, indent: int, width: int) -> int:
        """The list level a marker at ``indent`` belongs to, as CommonMark nests them:
        under the last item when at or past its content column, else beside it."""
        levels = self.levels
        while levels and levels[-1][0] > indent:
            self.lists.pop(levels.pop()[0], None)
        content = indent + width + 1
        if levels and indent >= levels[-1][1]:
            levels.append([levels[-1][1], content])
        elif levels:
            levels[-1][1] = content
        else:
            levels.append([0, content])
        return levels[-1][0]

    def apostrophes(self, core: str, start: int) -> list[Slot]:
        """Followers of the paragraph's style for the apostrophes of a word that has no
        choice of its own (a quoted word, a contraction kept as it is)."""
        return [Slot(TYPOGRAPHY, start + i, start + i + 1, _APOSTROPHES.index(c),
                     _APOSTROPHES, leader=self.style)
                for i, c in enumerate(core) if c in _APOSTROPHES]

    def new_paragraph(self) -> None:
        """Apostrophes and emphasis take one style per paragraph (up to a blank line):
        the first one's keyed choice, which the others (and any contraction written)
        follow."""
        self.style = self.ident()
        self.styled = False
        self.em_style = self.ident()
        self.em_styled = False

    def word(self, chunk: str, clean: str, match: re.Match[str], h0: str, h1: str,
             zw: str, *, sentence: bool, prose: bool,
             speech: bool = False) -> tuple[tuple[str, ...], Unit]:
        """A prose word's unit, and the chunk(s) it reads as in the history (its
        canonical form; two for a contraction)."""
        lead, em_open, core, inner, em_close, trail = match.groups()
        lower = core.lower()
        entry = INDEX.get(lower)
        apostrophes = "'" in core or "\u2019" in core
        if entry is None and not apostrophes and not em_open and not em_close \
                and lower not in contractions.AUX and lower != "cannot":
            # the common word (no pair, apostrophe, emphasis or contraction): no slot,
            # as the general case below finds
            unit = Unit(chunk, True, f"{h0}\x1f{h1}\x1f{lower}".encode(), None, zw)
            unit.prose = prose
            return (lower,), unit
        split: tuple[str, str] | None = None
        tokens: tuple[str, ...]
        if apostrophes:
            self.apostrophe = "\u2019" if "\u2019" in core else "'"
            split = contractions.history(lower)
            tokens = split or (lower.replace("'", "").replace("\u2019", ""),)
        elif lower == "cannot":
            split = contractions.history(lower)
            tokens = split or (lower,)
        else:
            tokens = (f"#{entry[0]}",) if entry else (lower,)
        context = f"{h0}\x1f{h1}\x1f{' '.join(tokens)}"
        unit = Unit(chunk, True, context.encode(), None, zw)   # positional: made per word
        # spans are in ``clean``: a chunk with invisible characters (``zw``) is read, for
        # detection, but never rewritten (see Marker)
        start = len(lead) + len(em_open or "")
        if not prose:
            if speech:  # a word inside a spoken "quote" keeps to its paragraph's style
                unit.slots = self.apostrophes(core, start) or None
            return tokens, unit
        unit.prose = True
        if split is not None:
            slot = contractions.one_word(core, start, h0, h1, sentence=sentence)
            if slot is not None:
                slot.style = self.style
            unit.slots = [slot] if slot else self.apostrophes(core, start) or None
            return tokens, unit
        if not (em_open or inner or em_close or trail) and lower in contractions.AUX:
            unit.pending = contractions.two_word(core, start, h0, h1, sentence=sentence,
                                                 apostrophe=self.apostrophe)
            if unit.pending is not None:
                unit.pending.style = self.style
        slots: list[Slot] = []
        case = _case(core, sentence)
        if entry is not None and not (entry[0] in ARTICLE_SENSITIVE and h1 in _ARTICLES) \
                and h1 not in _DETERMINED and case is not None:   # "a somebody" is a noun
            a, b = PAIRS[entry[0]]
            slots.append(Slot(LEXICAL, start, start + len(core), entry[1],
                              (case(a), case(b)), unit.context, pair=entry[0]))
            unit.pair, unit.member = entry[0], entry[1]
        at = -1
        if case is None and not core.startswith(("I'", "I\u2019")):
            # a name inside a sentence (the pronoun "I'd" is none): O'Brien keeps its
            # apostrophe, but a possessive ("Maya's") keeps to the paragraph's style
            if core[-2:-1] in _APOSTROPHES and core[-1:] == "s":
                slots.append(Slot(TYPOGRAPHY, start + len(core) - 2, start + len(core) - 1,
                                  _APOSTROPHES.index(core[-2]), _APOSTROPHES,
                                  leader=self.style))
            unit.slots = slots or None
            return tokens, unit
        for k in range(core.count("'") + core.count("\u2019") if apostrophes else 0):
            at = min(i for i in (core.find("'", at + 1), core.find("\u2019", at + 1)) if i >= 0)
            member = _APOSTROPHES.index(core[at])
            if self.styled:   # one style per paragraph: a mix would show
                slots.append(Slot(TYPOGRAPHY, start + at, start + at + 1, member,
                                  _APOSTROPHES, leader=self.style))
            else:
                self.styled = True
                slots.append(Slot(TYPOGRAPHY, start + at, start + at + 1, member,
                                  _APOSTROPHES, f"t\x1e{context}\x1f{k}".encode(),
                                  ident=self.style))
        if em_open and em_open == em_close:
            # one emphasis style per paragraph too: the first decides, the rest follow
            under = "_" * len(em_open)
            close_at = start + len(core) + len(inner)
            if self.em_styled:
                slots.append(Slot(MARKDOWN, len(lead), start, 0, (em_open, under),
                                  leader=self.em_style))
            else:
                self.em_styled = True
                slots.append(Slot(MARKDOWN, len(lead), start, 0, (em_open, under),
                                  f"e\x1e{context}".encode(), ident=self.em_style))
            slots.append(Slot(MARKDOWN, close_at, close_at + len(em_open), 0,
                              (em_open, under), leader=self.em_style))
        unit.slots = slots or None
        return tokens, unit

    def list_marker(self, chunk: str, indent: int, h0: str, h1: str) -> Unit:
        """A bullet or list number at the start of a line."""
        indent = self._level(indent, len(chunk))
        if chunk in BULLETS:
            kind, member, number = "bullet", BULLETS.index(chunk), 0
            variants = BULLETS
        else:
            match = ORDERED.fullmatch(chunk)
            if match is None:  # "+": a list we leave alone
                self.lists[indent] = _List("plus", 0, self.ident())
                return Unit(chunk)
            digits, delimiter = match.groups()
            kind, member, number = "ordered", ".)".index(delimiter), int(digits)
            variants = (digits + ".", digits + ")")
        current = self.lists.get(indent)
        if current is not None and current.kind == kind and current.member == member:
            # CommonMark continues a list with any item of the same kind and delimiter,
            # whatever its number: every one must follow the first
            return Unit(chunk, slots=[Slot(MARKDOWN, 0, len(chunk), member, variants,
                                           leader=current.ident)])
        ident = self.ident()
        self.lists[indent] = _List(kind, member, ident)
        if current is not None and current.kind == kind:
            # right after a list of the other variant: the two must stay apart (one
            # character would merge them), so this one takes the other variant
            return Unit(chunk, slots=[Slot(MARKDOWN, 0, len(chunk), member, variants,
                                           ident=ident, leader=current.ident, flip=1)])
        if kind == "ordered" and number > 1:
            # "2024. That year": not a list we mark, but items that continue it must
            # stay as they are: they follow a leader that never decides
            return Unit(chunk)
        return Unit(chunk, slots=[Slot(MARKDOWN, 0, len(chunk), member, variants,
                                       f"l\x1e{h0}\x1f{h1}\x1f{kind}".encode(),
                                       ident=ident)])


def _case(core: str, sentence: bool) -> Callable[[str], str] | None:
    if core.islower():
        return _lower
    if sentence and core[0].isupper() and (len(core) == 1 or core[1:].islower()):
        return str.capitalize
    return None  # a capital inside a sentence may be a name; all capitals a constant


def _lower(word: str) -> str:
    return word

