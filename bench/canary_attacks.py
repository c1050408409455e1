"""What an attacker does to marked text, for ``bench.canary``: leaks, re-randomisation,
and a distilled n-gram student."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker


def mark(keys: CanaryKeys, text: str, account: str, tripwire: bool = False) -> str:
    return Marker(keys, keys.code(account), tripwire=tripwire).mark(text)


def leak(keys: CanaryKeys, docs: list[str], account: str, words: int,
         rng: random.Random) -> list[str]:
    """About ``words`` words of responses marked for ``account``: whole documents from a
    random start, the last one cut at a word boundary."""
    out: list[str] = []
    have = 0
    start = rng.randrange(len(docs))
    for i in range(len(docs)):
        doc = mark(keys, docs[(start + i) % len(docs)], account)
        size = len(doc.split())
        if have + size >= words:
            cut = [m.start() for m in re.finditer(r"\s+", doc)]
            need = words - have
            out.append(doc[:cut[need - 1]] if 0 < need <= len(cut) else doc)
            return out
        out.append(doc)
        have += size
    return out  # the kind has fewer words than asked


class Rerandomiser(Marker):
    """An attacker who knows every channel and rewrites ``share`` of the sites at random
    (without the key, the best it can do is a coin)."""

    def __init__(self, share: float, rng: random.Random) -> None:
        super().__init__(CanaryKeys("attacker-does-not-know-the-key"), None)
        self.share = share
        self.rng = rng

    def choice(self, context: bytes) -> int | None:
        return self.rng.randrange(2) if self.rng.random() < self.share else None


def rerandomise(text: str, share: float, rng: random.Random) -> str:
    return Rerandomiser(share, rng).mark(text)


_TOKENS = re.compile(r"\n|[^\s]+")


def student(training: list[str], sample_words: list[int], seed: int = 3) -> dict[int, str]:
    """A trigram model trained on ``training`` (line breaks kept as tokens, so lists
    and paragraphs survive), sampled for each size in ``sample_words``."""
    tokens = [t for doc in training for t in (*_TOKENS.findall(doc), "\n", "\n")]
    tri: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
        tri[(a, b)][c] += 1
    table = {k: (list(v), list(v.values())) for k, v in tri.items()}
    rng = random.Random(seed)
    out = {}
    for n in sample_words:
        a, b = "\n", "\n"
        words: list[str] = []
        count = 0
        while count < n:
            nxt = table.get((a, b))
            if nxt is None:
                a, b = "\n", "\n"
                continue
            c = rng.choices(nxt[0], nxt[1])[0]
            words.append(c)
            count += c != "\n"
            a, b = b, c
        out[n] = "".join(w if w == "\n" or not i or words[i - 1] == "\n" else " " + w
                         for i, w in enumerate(words))
    return out
