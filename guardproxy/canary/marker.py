"""Marking text: the keyed choice at each slot, and the optional tripwire."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from guardproxy.canary.keys import ZW_ONE, ZW_ZERO, CanaryKeys
from guardproxy.canary.lexicon import PAIRS
from guardproxy.canary.slots import CONTRACTION, RECOMMENDED, TYPOGRAPHY, Slot, Unit
from guardproxy.canary.text import Scanner

_APOSTROPHES = ("'", "\u2019")


@dataclass(slots=True)
class MarkStats:
    words: int = 0
    sites: int = 0
    changed: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)   # sites per channel

    @property
    def changed_share(self) -> float:
        return self.changed / self.words if self.words else 0.0


class Marker:
    """Rewrites one text (a whole response, or one stream's deltas in order).

    ``channels``: which mark channels write (``slots.CHANNELS``); ``stops``: the
    request's stop sequences, which no variant may newly complete.
    """

    def __init__(self, keys: CanaryKeys, code: int | None, *,
                 channels: Iterable[str] = RECOMMENDED, tripwire: bool = False,
                 stops: Iterable[str] = ()) -> None:
        self.keys = keys
        self.code = code  # the account's codeword (CanaryKeys.code); None: global mark only
        self.tripwire = tripwire and code is not None
        stops = [s.lower() for s in stops if s]
        # a stop sequence could be completed by a contraction's new letters: none then
        self.channels = frozenset(c for c in channels if not (stops and c == CONTRACTION))
        # never write a word or mark that takes part in a stop sequence: no new stop match
        self.blocked = {i for i, pair in enumerate(PAIRS)
                        if any(w in s for s in stops for w in pair)} if stops else set()
        self.stop_chars = frozenset("".join(stops)) & frozenset("'\u2019*_-.)")
        self.scanner = Scanner()
        self.stats = MarkStats()
        self.decided: dict[int, int] = {}

    def feed(self, text: str) -> str:
        units = self.scanner.feed(text)
        # a unit that is no word and has no slot (whitespace) renders as its text
        return "".join([u.text if u.slots is None and not u.word else self._render(u)
                        for u in units]) if units else ""

    def flush(self) -> str:
        return "".join(self._render(u) for u in self.scanner.flush())

    def mark(self, text: str) -> str:
        return self.feed(text) + self.flush()

    def _render(self, unit: Unit) -> str:
        text = unit.text
        if unit.word:
            self.stats.words += 1
        if unit.slots and not unit.zw:   # spans are in the chunk without invisibles
            edits = []
            for slot in unit.slots:
                want = self._want(slot)
                if slot.style >= 0:
                    variant = self._styled(slot, slot.member if want is None else want)
                    if variant != text[slot.start:slot.end]:
                        edits.append((slot.start, slot.end, variant))
                elif want is not None and want != slot.member:
                    edits.append((slot.start, slot.end, slot.variants[want]))
            for start, end, variant in reversed(edits):
                text = text[:start] + variant + text[end:]
            self.stats.changed += bool(edits) and unit.word   # words, not list marks
        if self.tripwire and unit.word:
            wire = self.keys.tripwire(unit.context)
            if wire.present:
                assert self.code is not None
                bit = (self.code >> wire.position) & 1 ^ wire.mask
                text += ZW_ONE if bit else ZW_ZERO
        return text

    def _styled(self, slot: Slot, choice: int) -> str:
        """A contraction's variant with its apostrophe in its paragraph's style (the
        first apostrophe written there sets it when nothing chose one yet)."""
        variant = slot.variants[choice]
        mark = "'" if "'" in variant else "\u2019" if "\u2019" in variant else ""
        if not mark:
            return variant
        style = self.decided.setdefault(slot.style, _APOSTROPHES.index(mark))
        return variant.replace(mark, _APOSTROPHES[style])

    def _want(self, slot: Slot) -> int | None:
        if slot.ident >= 0 and slot.ident in self.decided:
            return self.decided[slot.ident]   # a contraction set the paragraph's style
        if slot.leader >= 0:
            led = self.decided.get(slot.leader)
            if led is None and slot.channel == TYPOGRAPHY:
                # the first apostrophe written in a paragraph sets its style
                led = self.decided[slot.leader] = slot.member
            if led is None:
                return None
            if slot.ident >= 0:
                self.decided[slot.ident] = led ^ slot.flip
            return led ^ slot.flip
        if slot.channel not in self.channels or slot.pair in self.blocked \
                or (self.stop_chars and any(c in self.stop_chars for v in slot.variants
                                            for c in v)):
            return None
        want = self.choice(slot.context)
        if want is None:
            return None
        self.stats.sites += 1
        self.stats.by_channel[slot.channel] = self.stats.by_channel.get(slot.channel, 0) + 1
        if slot.ident >= 0:
            self.decided[slot.ident] = want
        return want

    def choice(self, context: bytes) -> int | None:
        site = self.keys.site(context)
        if not site.marked:
            return None
        if site.is_global:
            return site.global_choice
        if self.code is None:
            return None
        return (self.code >> site.position) & 1 ^ site.mask
