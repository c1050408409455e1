"""The canary's marks are byte-identical to what they were before the response path was
made faster (issue 12): the scanner, channels and marker were only sped up, never changed.

A digest of everything marking produces over the test corpus (``tests/data``): each
text marked whole and streamed in random pieces, under five settings (two keys, the
tripwire, no account code, stop sequences, fewer channels), the marking statistics and
every slot detection reads. The pinned value was computed with the code as it was before
(commit c412d3e). A change of the corpus, or a deliberate change of the marks, changes
it: then compute it again (``python -m tests.test_fast_canary_marks``) and say why in
the commit.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path
from typing import Any

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.text import read_slots

DATA = Path(__file__).parent / "data"
PINNED = "777c1f5131f21db63a91c92e720ae2091c39eab031647cf778ae83590a6b5336"


def corpus() -> list[tuple[str, str]]:
    files = [*sorted(DATA.glob("corpus/*/*.md")), DATA / "prose.txt", DATA / "ledger_answers.md"]
    return [(str(p.relative_to(DATA)), p.read_text()) for p in files]


def settings() -> list[tuple[CanaryKeys, int | None, dict[str, Any]]]:
    one = CanaryKeys("fast-marks-0123456789abcdef")
    two = CanaryKeys("fast-marks-other", 0.5, tripwire=True)
    return [(one, one.code("alice"), {}), (two, two.code("bob"), {"tripwire": True}),
            (one, None, {}), (one, one.code("carol"), {"stops": ("often", "'", "\n\n")}),
            (one, one.code("dave"), {"channels": ("lexical", "typography")})]


def digest() -> str:
    h = hashlib.sha256()
    rng = random.Random(20)
    for name, text in corpus():
        h.update(name.encode())
        for keys, code, options in settings():
            marker = Marker(keys, code, **options)
            h.update(marker.mark(text).encode("utf-8", "surrogatepass"))
            s = marker.stats
            h.update(repr((s.words, s.sites, s.changed, sorted(s.by_channel.items()))).encode())
            marker = Marker(keys, code, **options)
            cuts = sorted({0, len(text),
                           *(rng.randrange(len(text) + 1) for _ in range(len(text) // 4))})
            h.update("".join(marker.feed(text[a:b]) for a, b in itertools.pairwise(cuts))
                     .encode("utf-8", "surrogatepass"))
            h.update(marker.flush().encode("utf-8", "surrogatepass"))
        h.update(repr([(s.channel, s.start, s.end, s.member, s.variants, s.context)
                       for s in read_slots(text)]).encode())
    return h.hexdigest()


def test_marks_are_what_they_were() -> None:
    assert digest() == PINNED


if __name__ == "__main__":
    print(digest())
