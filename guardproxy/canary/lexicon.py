"""Interchangeable word pairs for keyed lexical marks.

A pair belongs here only if either word can replace the other wherever it occurs in
prose without changing meaning or grammar. That rules out words with a second part of
speech that the other lacks (``while`` as in *a while*, ``likely`` as in *is likely
to*, ``objective`` the adjective, ``offers`` the noun, ``primary key``), and verb forms
that are both past tense and participle in one word but not the other
(*started/began*). Mostly adverbs, then adjectives, verb forms and plural nouns, and
spelling variants that are standard in American English.

Where the two words need different articles (*a huge* / *an enormous*) a site after
``a``/``an`` is skipped; see :data:`ARTICLE_SENSITIVE`.
"""

from __future__ import annotations

PAIRS: tuple[tuple[str, str], ...] = (
    # adverbs of frequency, degree and manner
    ("often", "frequently"), ("usually", "typically"), ("perhaps", "maybe"),
    ("quickly", "rapidly"), ("completely", "entirely"), ("nearly", "almost"),
    ("mostly", "largely"), ("certainly", "definitely"), ("slightly", "somewhat"),
    ("roughly", "approximately"), ("gradually", "progressively"),
    ("immediately", "instantly"), ("primarily", "mainly"), ("especially", "particularly"),
    ("significantly", "substantially"), ("sometimes", "occasionally"),
    ("rarely", "seldom"), ("precisely", "exactly"), ("apparently", "seemingly"),
    ("essentially", "basically"), ("chiefly", "principally"),
    ("extremely", "exceedingly"), ("virtually", "practically"),
    ("sufficiently", "adequately"), ("solely", "exclusively"),
    ("inherently", "intrinsically"), ("explicitly", "expressly"), ("genuinely", "truly"),
    ("hardly", "barely"), ("considerably", "markedly"), ("partly", "partially"),
    ("deliberately", "intentionally"), ("accidentally", "unintentionally"),
    ("mistakenly", "erroneously"), ("simultaneously", "concurrently"),
    ("properly", "correctly"), ("swiftly", "speedily"), ("continually", "repeatedly"),
    ("incredibly", "extraordinarily"),
    # sentence adverbs and connectives
    ("thus", "therefore"), ("additionally", "furthermore"),
    ("nonetheless", "nevertheless"), ("anyway", "anyhow"),
    ("unfortunately", "regrettably"), ("fortunately", "luckily"),
    ("importantly", "crucially"),
    # adjectives
    ("big", "large"), ("bigger", "larger"), ("biggest", "largest"), ("huge", "enormous"),
    ("vast", "immense"), ("tiny", "minuscule"), ("rapid", "swift"),
    ("quickest", "fastest"), ("simple", "straightforward"), ("essential", "vital"),
    ("useful", "helpful"), ("obvious", "evident"), ("similar", "comparable"),
    ("accurate", "precise"), ("appropriate", "suitable"), ("adequate", "sufficient"),
    ("rare", "uncommon"), ("strange", "peculiar"), ("reliable", "dependable"),
    ("beneficial", "advantageous"), ("costly", "expensive"), ("terrible", "awful"),
    ("rigid", "inflexible"), ("flexible", "adaptable"), ("gigantic", "colossal"),
    ("ample", "plentiful"), ("thorough", "comprehensive"),
    # verb forms that have no other part of speech in the pair
    ("using", "utilizing"), ("bought", "purchased"), ("buying", "purchasing"),
    ("choose", "select"), ("choosing", "selecting"), ("chooses", "selects"),
    ("modify", "alter"), ("modifies", "alters"), ("modifying", "altering"),
    ("modified", "altered"), ("helps", "assists"), ("helped", "assisted"),
    ("examine", "inspect"), ("examines", "inspects"), ("examined", "inspected"),
    ("examining", "inspecting"), ("acquire", "obtain"), ("acquires", "obtains"),
    ("acquired", "obtained"), ("acquiring", "obtaining"), ("improve", "enhance"),
    ("improves", "enhances"), ("improved", "enhanced"), ("improving", "enhancing"),
    ("tried", "attempted"), ("trying", "attempting"), ("verify", "confirm"),
    ("verifies", "confirms"), ("verified", "confirmed"), ("verifying", "confirming"),
    ("reduces", "lowers"), ("reduced", "lowered"), ("reducing", "lowering"),
    ("begins", "commences"), ("helping", "assisting"),
    # indefinite pronouns
    ("everyone", "everybody"), ("someone", "somebody"), ("anyone", "anybody"),
    # plural nouns
    ("goals", "objectives"), ("drawbacks", "disadvantages"), ("options", "choices"),
    ("photos", "photographs"),
    # spelling variants, both standard in American English
    ("toward", "towards"), ("afterward", "afterwards"), ("among", "amongst"),
    ("amid", "amidst"), ("judgment", "judgement"), ("gray", "grey"), ("burned", "burnt"),
    ("dreamed", "dreamt"), ("leaped", "leapt"), ("acknowledgment", "acknowledgement"),
)


def build_index(pairs: tuple[tuple[str, str], ...] = PAIRS) -> dict[str, tuple[int, int]]:
    return {word: (i, j) for i, pair in enumerate(pairs) for j, word in enumerate(pair)}


def takes_an(word: str) -> bool:
    """Whether the word is written after *an* (a vowel sound; "useful" is not)."""
    return word[0] in "aeiou" and not word.startswith(("use", "usu", "uni", "eu"))


INDEX = build_index()
ARTICLE_SENSITIVE: frozenset[int] = frozenset(
    i for i, (a, b) in enumerate(PAIRS) if takes_an(a) != takes_an(b)
)
