"""Interchangeable word pairs for keyed lexical marks.

The bar: a pair belongs here only if either word can replace the other in *every*
context of a large, varied corpus (``bench/texts.py``: stdlib documentation, package
READMEs, assistant answers, dialogue and prose, about 300,000 words) without changing
meaning, grammar, idiom or register, and without renaming a technical term; and if no
common sense or idiom outside the corpus is known to break it either. A pair must also
occur in that corpus: one that never does carries no signal. Fewer pairs beat wrong ones.

Each context that sank a pair is a row of ``tests/data/corpus/rejected_contexts.tsv``
and a regression test (``tests/test_canary_lexicon.py``). What failed, in kind:

- a second sense or part of speech (*roughly* = harshly, *trying* = difficult,
  *helping* the noun, *rare* steak, *typically* = characteristically);
- idioms and fixed phrases (*every so often*, *not nearly*, *the vast majority*,
  *buy time*, *for obvious reasons*, *when appropriate*, *Yours truly*);
- grammar (*it helps to*, *things improve*, *thus changing*, *partly as*);
- terms of art (*acquire* a lock, *select* a mailbox, *verify* a certificate,
  *correctly rounded*, *simple linear regression*, *rapid eye movement*, command-line
  *options*, *run concurrently*);
- register: formal or bookish words in casual speech (*utilizing*, *seldom*,
  *regrettably*, *amongst*, *primarily*, *photographs*);
- echoes: a speaker repeating another's word (*slightly!!!*), which independent marks
  can break.

Identifiers and code that merely spell a lexicon word (``acquire()``, ``inspect.x``,
``alter_sys``, quoted strings, key-value lines) are the scanner's job
(:mod:`guardproxy.canary.text`), not a reason to keep or drop a pair; so are capitalised
words inside a sentence (proper nouns), which the scanner does not mark.

Where the two words of a pair need different articles (*a huge* / *an enormous*) a site
after ``a``/``an`` is skipped; see :data:`ARTICLE_SENSITIVE` (empty for today's pairs).
"""

from __future__ import annotations

# Indefinite pronouns: the -one and -body forms are the same word in every register.
INDEFINITE_PRONOUNS: tuple[tuple[str, str], ...] = (
    ("everyone", "everybody"), ("someone", "somebody"), ("anyone", "anybody"),
)
# The -ward / -wards forms of a preposition or adverb with no adjective use
# (unlike backward, upward, onward): both are standard in American English.
WARD_VARIANTS: tuple[tuple[str, str], ...] = (
    ("toward", "towards"), ("afterward", "afterwards"),
)
# Concessive connectives that differ in spelling only.
CONCESSIVES: tuple[tuple[str, str], ...] = (
    ("nonetheless", "nevertheless"),
)
CATEGORIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("indefinite pronoun", INDEFINITE_PRONOUNS),
    ("-ward/-wards variant", WARD_VARIANTS),
    ("concessive connective", CONCESSIVES),
)
PAIRS: tuple[tuple[str, str], ...] = tuple(pair for _, pairs in CATEGORIES for pair in pairs)


def build_index(pairs: tuple[tuple[str, str], ...] = PAIRS) -> dict[str, tuple[int, int]]:
    """word -> (pair index, position in the pair)."""
    return {word: (i, j) for i, pair in enumerate(pairs) for j, word in enumerate(pair)}


def takes_an(word: str) -> bool:
    """Whether the word is written after *an* (a vowel sound; "useful" is not)."""
    return word[0] in "aeiou" and not word.startswith(("use", "usu", "uni", "eu"))


INDEX = build_index()
ARTICLE_SENSITIVE: frozenset[int] = frozenset(
    i for i, (a, b) in enumerate(PAIRS) if takes_an(a) != takes_an(b)
)
