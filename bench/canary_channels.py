"""Mark channels, measured: ``python -m bench.canary_channels [--max-words N] [--json F]``.

For each kind of text in ``bench/texts.py`` and each channel: the *density* (sites a
marker uses per 100 words) and what survives common handling of the marked text — the
share of its sites still read with the same variant after:

- ``nfkc``: Unicode NFKC normalisation (what many training-data pipelines apply),
- ``uncurl``: curly quotes and apostrophes made straight (ftfy's ``uncurl_quotes``),
- ``render``: markdown rendered and copied as text (tags dropped),
- ``collapse``: all whitespace runs collapsed to one space,
- ``retype``: a person re-typing it from the rendered page (render + uncurl).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from markdown_it import MarkdownIt

from bench.texts import kinds
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.slots import CHANNELS
from guardproxy.canary.text import read_slots

KEYS = CanaryKeys("bench-channels-secret-0123456789")
_MD = MarkdownIt("commonmark")
_TAGS = re.compile(r"<[^>]+>")


def _render(text: str) -> str:
    return html.unescape(_TAGS.sub("", _MD.render(text)))


def _uncurl(text: str) -> str:
    return text.translate(str.maketrans("\u2018\u2019\u201c\u201d", "''\"\""))


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "nfkc": lambda t: unicodedata.normalize("NFKC", t),
    "uncurl": _uncurl,
    "render": _render,
    "collapse": lambda t: " ".join(t.split()),
    "retype": lambda t: _uncurl(_render(t)),
}


def measure(docs: list[str], max_words: int) -> dict[str, object]:
    words = 0
    used: Counter[str] = Counter()
    kept: dict[str, Counter[str]] = {name: Counter() for name in TRANSFORMS}
    for i, doc in enumerate(docs):
        if words >= max_words:
            break
        marker = Marker(KEYS, KEYS.code(f"acct-{i}"))
        marked = marker.mark(doc)
        words += marker.stats.words
        used.update(marker.stats.by_channel)
        before = {(s.context, s.member): s.channel for s in read_slots(marked)}
        for name, transform in TRANSFORMS.items():
            after = {(s.context, s.member) for s in read_slots(transform(marked))}
            kept[name].update(ch for key, ch in before.items() if key in after)
        # sites read in the marked text, per channel (the denominator of survival)
        used.update({f"read:{ch}": n for ch, n in Counter(before.values()).items()})
    out: dict[str, object] = {"words": words}
    for ch in CHANNELS:
        read = used[f"read:{ch}"]
        out[ch] = {"per_100_words": round(100 * used[ch] / max(1, words), 3),
                   **{f"survives_{name}": round(kept[name][ch] / read, 3) if read else None
                      for name in TRANSFORMS}}
    out["all_per_100_words"] = round(100 * sum(used[ch] for ch in CHANNELS) / max(1, words), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-words", type=int, default=200_000,
                        help="words of each kind to mark (default 200,000)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {kind: measure(docs, args.max_words) for kind, docs in kinds().items()}
    for kind, row in results.items():
        print(f"{kind}: {row['words']:,} words, {row['all_per_100_words']} sites per 100 words")
        for ch in CHANNELS:
            print(f"  {ch:12} {row[ch]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
