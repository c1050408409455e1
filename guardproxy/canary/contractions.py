"""The contraction channel: ``does not`` or ``doesn't``, ``will not`` or ``won't``.

Expanding is where the two forms part: a contraction before what may be its subject
(an inverted question: ``why doesn't the cache…`` has no ``does not`` twin) is never
undone.

Only negations with an auxiliary, where both forms mean exactly the same and are both
standard: ``is/are/was/were/do/does/did/has/have/had/would/should/could not`` and
``will not`` / ``won't``, ``cannot`` / ``can't``. Left alone: every form that is
ungrammatical or changes meaning once swapped —

- inversion: a contraction before its subject (``doesn't it?``, ``Isn't the cache…``)
  has no uncontracted twin, so none followed by a pronoun, and none that starts a
  sentence except the imperative ``Don't`` / ``Do not``;
- ``not`` that belongs to code or logic: before ``None``/``True``/``False``/``null`` or
  a code-like chunk (``x is not None``), or after a one-letter variable (``x is not y``);
- ``do``/``have`` after ``to`` or a modal (``to do not only…``, ``would have not``);
- an emphasised ``not`` (``does *not*``), and ``can not``, which may mean "is free not to".

The two forms feed the same context to every other slot: ``doesn't`` reads as the two
chunks ``does not`` (see ``history``).
"""

from __future__ import annotations

import re

from guardproxy.canary.shapes import code_like
from guardproxy.canary.slots import CONTRACTION, TYPOGRAPHY, Slot, Unit

_AUX = {"is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't",
        "does": "doesn't", "do": "don't", "did": "didn't", "has": "hasn't",
        "have": "haven't", "had": "hadn't", "would": "wouldn't", "should": "shouldn't",
        "could": "couldn't", "will": "won't"}
_CONTRACTED = {v: k for k, v in _AUX.items()} | {"can't": "can"}
AUX = frozenset(_AUX)   # the only words ``two_word`` makes a slot of (lower-cased)
NOT = re.compile(r"not([.,;:!?]{0,3}\)?[.,;:!?]{0,3})")
SUBJECTS = frozenset({"i", "you", "he", "she", "it", "we", "they", "there", "that", "this",
                      "these", "those", "one"})
# words that can begin a noun phrase, so the subject of an inverted question
_SUBJECT_STARTS = SUBJECTS | frozenset({
    "the", "a", "an", "my", "your", "his", "her", "its", "our", "their", "some", "any",
    "most", "all", "every", "each", "no", "both", "either", "neither", "many", "much",
    "few", "several", "everyone", "everybody", "someone", "somebody", "anyone",
    "anybody", "nobody", "people", "enough", "such", "what", "which", "whose"})
_LOGIC = frozenset({"none", "true", "false", "null", "nil"})
_APOSTROPHES = ("'", "\u2019")
_DETERMINERS = frozenset({"the", "a", "an", "this", "that", "my", "your", "his", "her",
                          "its", "our", "their", "no", "every", "each"})
_AFTER_MODAL = frozenset({"do", "have"})
_MODALS = frozenset({"to", "would", "could", "should", "might", "must", "will", "may",
                     "can", "shall"})


def history(lower: str) -> tuple[str, str] | None:
    """The two chunks a one-word contraction reads as (``can't`` -> can, not)."""
    plain = lower.replace("\u2019", "'")
    if plain == "cannot":
        return ("can", "not")
    aux = _CONTRACTED.get(plain)
    return (aux, "not") if aux else None


def _case(words: tuple[str, str], core: str, sentence: bool) -> tuple[str, str] | None:
    if core.islower():
        return words
    if sentence and core[0].isupper() and core[1:].islower():
        return words[0].capitalize(), words[1].capitalize()
    return None


def one_word(core: str, start: int, h0: str, h1: str, *, sentence: bool) -> Slot | None:
    """The slot of ``doesn't``, ``can't`` or ``cannot`` at ``start`` in its chunk."""
    plain = core.lower().replace("\u2019", "'")
    aux = "can" if plain == "cannot" else _CONTRACTED.get(plain)
    if aux is None or (sentence and aux != "do") or (aux in _AFTER_MODAL and h1 in _MODALS):
        return None
    if _case(("x", "y"), core, sentence) is None:
        return None
    if plain == "cannot":   # one word either way: contracting it is safe
        variants = _case(("cannot", "can't"), core, sentence)
        assert variants is not None
        return Slot(CONTRACTION, start, start + len(core), 0, variants,
                    f"c\x1e{h0}\x1f{h1}\x1fcan".encode())
    apostrophe = "\u2019" if "\u2019" in core else "'"
    contracted = "won't" if aux == "will" else "can't" if aux == "can" else f"{aux}n't"
    full = "cannot" if aux == "can" else f"{aux} not"
    variants = _case((full, contracted.replace("'", apostrophe)), core, sentence)
    if variants is None:
        return None
    return Slot(CONTRACTION, start, start + len(core), 1, variants,
                f"c\x1e{h0}\x1f{h1}\x1f{aux}".encode())


def two_word(core: str, start: int, h0: str, h1: str, *, sentence: bool,
             apostrophe: str) -> Slot | None:
    """The slot ``does`` of ``does not`` would lead, if ``not`` follows."""
    aux = core.lower()
    if aux not in _AUX or (sentence and aux != "do") or (aux in _AFTER_MODAL and h1 in _MODALS) \
            or (len(h1) == 1 and h1.isalpha() and h1 not in ("a", "i")) or h1 in _DETERMINERS:
        return None   # "the will not to quit", "a do not resuscitate order"
    variants = _case((core.lower(), _AUX[aux].replace("'", apostrophe)), core, sentence)
    if variants is None:
        return None
    return Slot(CONTRACTION, start, start + len(core), 0, variants,
                f"c\x1e{h0}\x1f{h1}\x1f{aux}".encode())


def follows(not_unit: Unit, gap: str) -> bool:
    """Whether ``not_unit`` can complete a pending ``does``: a plain ``not`` one space on."""
    return gap == " " and not_unit.prose and NOT.fullmatch(not_unit.text) is not None


def complete(aux: Unit, spaces: list[Unit], negation: Unit, following: str | None,
             ident: int) -> None:
    """Give ``does`` + space + ``not`` their slots, unless what follows ``not`` is logic
    or code (``is not None``)."""
    slot = aux.pending
    aux.pending = None
    if slot is None or not negation.prose or (following is not None and (
            following.strip(".,;:!?)").lower() in _LOGIC or code_like(following))):
        return
    slot.ident = ident
    aux.slots = [*(aux.slots or ()), slot]
    for space in spaces:
        space.slots = [Slot(CONTRACTION, 0, len(space.text), 0, (space.text, ""),
                            leader=ident)]
    negation.slots = [*(negation.slots or ()), Slot(CONTRACTION, 0, 3, 0, ("not", ""),
                                                    leader=ident)]


def before_subject(unit: Unit, following: str | None) -> None:
    """Drop a contraction's slot when what follows may be its subject, an inversion
    with no uncontracted twin (``doesn't it?``, ``why doesn't the cache…``, ``Don't
    most browsers…``, ``isn't Python…``); its apostrophe still keeps to its paragraph's
    style."""
    if following is None:
        return
    word = following.strip(".,;:!?)\"'*_(\u201c\u201d")
    if word.lower() not in _SUBJECT_STARTS and not word[:1].isupper() \
            and not word[:1].isdigit():
        return
    for slot in unit.slots or ():
        if slot.channel == CONTRACTION and slot.style >= 0 and slot.context:
            unit.drop(CONTRACTION)
            text = unit.text
            unit.slots = [Slot(TYPOGRAPHY, i, i + 1, _APOSTROPHES.index(c), _APOSTROPHES,
                               leader=slot.style)
                          for i, c in enumerate(text) if c in _APOSTROPHES] or None
            return
