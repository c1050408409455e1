"""Interchangeable word pairs for keyed lexical marks (provisional table)."""

from __future__ import annotations

PAIRS: tuple[tuple[str, str], ...] = (
    ("often", "frequently"), ("usually", "typically"), ("perhaps", "maybe"),
    ("quickly", "rapidly"), ("completely", "entirely"), ("nearly", "almost"),
    ("mostly", "largely"), ("certainly", "definitely"), ("slightly", "somewhat"),
    ("roughly", "approximately"), ("easily", "readily"), ("gradually", "progressively"),
    ("immediately", "instantly"), ("primarily", "mainly"), ("especially", "particularly"),
    ("significantly", "substantially"), ("thus", "therefore"), ("additionally", "furthermore"),
    ("sometimes", "occasionally"), ("rarely", "seldom"), ("precisely", "exactly"),
    ("apparently", "seemingly"), ("essentially", "basically"), ("big", "large"),
    ("bigger", "larger"), ("biggest", "largest"), ("huge", "enormous"), ("rapid", "swift"),
    ("simple", "straightforward"), ("difficult", "challenging"), ("essential", "vital"),
    ("main", "primary"), ("whole", "entire"), ("useful", "helpful"), ("obvious", "evident"),
    ("similar", "comparable"), ("quickest", "fastest"), ("using", "utilizing"),
    ("buy", "purchase"), ("bought", "purchased"), ("choose", "select"),
    ("choosing", "selecting"), ("chooses", "selects"), ("provides", "offers"),
    ("allows", "enables"), ("allowing", "enabling"), ("modify", "alter"),
    ("modifying", "altering"), ("modified", "altered"), ("goal", "objective"),
    ("goals", "objectives"), ("while", "whilst"), ("among", "amongst"),
    ("toward", "towards"), ("afterward", "afterwards"), ("probably", "likely"),
)


def build_index(pairs: tuple[tuple[str, str], ...] = PAIRS) -> dict[str, tuple[int, int]]:
    return {word: (i, j) for i, pair in enumerate(pairs) for j, word in enumerate(pair)}


INDEX = build_index()
