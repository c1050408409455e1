"""What the scanner finds in text: units, and the slots where a mark channel may write.

A *unit* is one piece of the text as it will be sent: a whitespace run or a chunk (a
run of non-whitespace). A *slot* is a span of a unit where a channel can write either of
two variants that read the same: a word of a lexicon pair, a straight or curly
apostrophe, an asterisk or underscore around emphasis, a ``-`` or ``*`` list bullet, a
``1.`` or ``1)`` list number. A slot's ``context`` is what the keyed site function
reads; followers (the closing emphasis mark, the later bullets of one list) have no
context of their own and copy the choice made at their leader, so a list keeps one
bullet and emphasis stays balanced.

Invariant every channel keeps: choosing either variant never changes any slot's
context, nor which slots exist, except by removing some (detection is then only told
less, never something wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

LEXICAL, TYPOGRAPHY, MARKDOWN = "lexical", "typography", "markdown"
CONTRACTION = "contraction"
CHANNELS = (LEXICAL, TYPOGRAPHY, MARKDOWN, CONTRACTION)
RECOMMENDED: frozenset[str] = frozenset(CHANNELS)


@dataclass(slots=True)
class Slot:
    channel: str
    start: int                   # span in the unit's text
    end: int
    member: int                  # which variant the text has: 0 or 1
    variants: tuple[str, str]
    context: bytes = b""         # keyed-site input; empty for a follower
    ident: int = -1              # >= 0: followers copy the choice made here
    leader: int = -1             # >= 0: copy the choice made at that slot
    flip: int = 0                # 1: take the other variant than the leader took
    pair: int = -1               # lexical pair index (for stop sequences)
    style: int = -1              # a contraction's apostrophe follows this style group


@dataclass(slots=True)
class Unit:
    text: str
    word: bool = False           # a prose word (counted; carries the tripwire)
    context: bytes = b""         # the word's left context and canonical form
    slots: list[Slot] | None = None
    zw: str = ""                 # zero-width characters the chunk carried
    pair: int = -1               # its lexical slot's pair, else -1
    member: int = -1             # and which word of the pair it is
    prose: bool = False          # a word a mark may touch (not code, quoted, data)
    pending: Slot | None = None  # "does" of "does not": a slot if "not" follows

    def drop(self, *channels: str) -> None:
        """Remove this unit's slots of these channels (a look-ahead found a reason)."""
        if self.slots:
            self.slots = [s for s in self.slots if s.channel not in channels] or None
            if LEXICAL in channels:
                self.pair = self.member = -1
