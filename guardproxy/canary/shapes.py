"""Chunk shapes: what in text is prose a mark may touch, and what is code-like.

A chunk is a run of non-whitespace. Only a *prose word* can hold a lexical or
typographic slot: letters with inner apostrophes, optionally wrapped in ``*``/``**``
emphasis and an opening ``(``, then closing punctuation. Anything else that looks like
code — identifiers (``snake_case``, ``camelCase``, ``obj.attr``, ``ns::name``, calls),
paths, operators, markup — is *code-like*, and prose words right next to it are left
alone too (``blocked in acquire()``, ``select or poll(2)``).
"""

from __future__ import annotations

import re

# ("**word's:**"). — groups: opening paren or quotes, opening emphasis, core,
# punctuation inside the emphasis, closing emphasis, closing punctuation and quotes
PROSE = re.compile("([(\"\u201c\u2018]{0,2})(\\*{1,2})?([A-Za-z]+(?:['\u2019][A-Za-z]+)*)"
                   "([.,;:!?]{0,3})(\\*{1,2})?([.,;:!?)\"\u201d\u2019]{0,5})")
_CODE_CHARS = frozenset("_(){}[]<>=/\\$#@|~^`%&+")
CAMEL = re.compile(r"[a-z][A-Z]|[A-Z]{2}[a-z]")
_DOTTED = re.compile(r"[A-Za-z]\.[A-Za-z]")
_NOT_ALNUM = re.compile(r"[\W_]+")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "a.m", "p.m", "u.s", "u.k", "et.al", "ph.d"})
KEY = re.compile(r"[\"']?[A-Za-z_][\w.\-]*[\"']?:")
ORDERED = re.compile(r"(\d{1,9})([.)])")
BULLETS = ("-", "*")
SENTENCE_END = frozenset(".!?:")
QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "\u2018": "\u2019", "\u00ab": "\u00bb"}


def code_like(chunk: str, prose: re.Match[str] | bool | None = True) -> bool:
    """Identifiers, calls, paths, operators and markup (never a plain prose word).
    ``prose``: ``PROSE.fullmatch(chunk)`` when the caller has it already."""
    if prose is True:
        prose = PROSE.fullmatch(chunk)
    camel = not chunk.islower() and CAMEL.search(chunk) is not None  # (needs a capital)
    if prose and not camel:
        return False
    if not _CODE_CHARS.isdisjoint(chunk) or "::" in chunk or camel:
        return True
    dotted = _DOTTED.search(chunk) if "." in chunk else None
    return dotted is not None and chunk.strip(".,;:!?()").lower() not in _ABBREVIATIONS


def canonical(chunk: str) -> str:
    """A chunk's letters and digits, lower-cased: the same for every variant a channel
    may write (apostrophes, emphasis marks, bullets and list delimiters are dropped)."""
    lower = chunk.lower()
    # (what _NOT_ALNUM removes is exactly what str.isalnum refuses)
    return lower if lower.isalnum() else _NOT_ALNUM.sub("", lower) or "_"
