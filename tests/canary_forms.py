"""A normal form of text under every canary channel: two texts have the same normal
form iff they differ only by choices a mark may make (tests only)."""

from __future__ import annotations

import re

from guardproxy.canary.lexicon import INDEX

_CONTRACTED = {"isn't": "is not", "aren't": "are not", "wasn't": "was not",
               "weren't": "were not", "doesn't": "does not", "don't": "do not",
               "didn't": "did not", "hasn't": "has not", "haven't": "have not",
               "hadn't": "had not", "wouldn't": "would not", "shouldn't": "should not",
               "couldn't": "could not", "won't": "will not", "can't": "cannot"}
_CONTRACTION = re.compile(r"\b(" + "|".join(re.escape(k) for k in _CONTRACTED) + r")\b",
                          re.IGNORECASE)


def _expand(m: re.Match[str]) -> str:
    word = m.group()
    full = _CONTRACTED[word.lower()]
    return full.capitalize() if word[0].isupper() else full


def normal_form(text: str) -> str:
    text = text.replace("\u2019", "'")
    text = _CONTRACTION.sub(_expand, text)
    text = re.sub(r"(?<![\w_])__(?=\S)([^_\n]*?\S)__(?![\w])", r"**\1**", text)
    text = re.sub(r"(?<![\w_])_(?=\S)([^_\n]*?\S)_(?![\w])", r"*\1*", text)
    text = re.sub(r"^(\s*)\*(?= |$)", r"\1-", text, flags=re.M)
    text = re.sub(r"^(\s*\d{1,9})\)(?= |$)", r"\1.", text, flags=re.M)

    def pair(m: re.Match[str]) -> str:
        entry = INDEX.get(m.group().lower())
        return f"<{entry[0]}>" if entry else m.group()
    return re.sub(r"[A-Za-z]+", pair, text)
