"""Marking text: the keyed choice at each site, and the optional tripwire."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from guardproxy.canary.keys import ZW_ONE, ZW_ZERO, CanaryKeys
from guardproxy.canary.lexicon import PAIRS
from guardproxy.canary.text import Scanner, Unit, apply_case


@dataclass(slots=True)
class MarkStats:
    words: int = 0
    sites: int = 0
    changed: int = 0

    @property
    def changed_share(self) -> float:
        return self.changed / self.words if self.words else 0.0


class Marker:
    """Rewrites one text (a whole response, or one stream's deltas in order)."""

    def __init__(self, keys: CanaryKeys, code: int | None, *, lexical: bool = True,
                 tripwire: bool = False, stops: Iterable[str] = ()) -> None:
        self.keys = keys
        self.code = code  # the account's codeword (CanaryKeys.code); None: global mark only
        self.lexical = lexical
        self.tripwire = tripwire and code is not None
        stops = [s.lower() for s in stops if s]
        # never choose a word that takes part in a stop sequence: no new stop match
        self.blocked = {i for i, pair in enumerate(PAIRS)
                        if any(w in s for s in stops for w in pair)} if stops else set()
        self.scanner = Scanner()
        self.stats = MarkStats()

    def feed(self, text: str) -> str:
        units = self.scanner.feed(text)
        return "".join(self._render(u) for u in units) if units else ""

    def flush(self) -> str:
        return "".join(self._render(u) for u in self.scanner.flush())

    def mark(self, text: str) -> str:
        return self.feed(text) + self.flush()

    def _render(self, unit: Unit) -> str:
        if not unit.context:
            return unit.text
        self.stats.words += 1
        text = unit.text
        if self.lexical and unit.pair >= 0 and unit.pair not in self.blocked and not unit.zw:
            want = self.choice(unit)
            if want is not None:
                self.stats.sites += 1
                if want != unit.member:
                    self.stats.changed += 1
                    word = apply_case(PAIRS[unit.pair][want], unit.case)
                    start = unit.word_start
                    text = text[:start] + word + text[start + len(unit.core):]
        if self.tripwire:
            slot = self.keys.tripwire(unit.context)
            if slot.present:
                assert self.code is not None
                bit = (self.code >> slot.position) & 1 ^ slot.mask
                text += ZW_ONE if bit else ZW_ZERO
        return text

    def choice(self, unit: Unit) -> int | None:
        site = self.keys.site(unit.context)
        if not site.marked:
            return None
        if site.is_global:
            return site.global_choice
        if self.code is None:
            return None
        return (self.code >> site.position) & 1 ^ site.mask
