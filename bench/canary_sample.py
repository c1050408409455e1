"""For ``bench.canary``: the streaming cost of a canary, and a blind sample of marked
sentences for a person to judge."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from bench.texts import sentences
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import ResponseStage

_HEADERS = [(b"content-type", b"text/event-stream")]


def _events(text: str, limit: int) -> list[bytes]:
    words = text.split(" ")[:limit]
    blocks = []
    for i, word in enumerate(words):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word},
                              "finish_reason": None}]}
        blocks.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    return [*blocks, b"data: [DONE]\n\n"]


def stream_cost(keys: CanaryKeys, corpus: dict[str, list[str]],
                events: int) -> dict[str, object]:
    """CPU per SSE event through the response driver, bare and with a canary stage
    (every recommended channel); the share of words changed and sites per 100 words."""
    text = "\n\n".join(corpus["assistant"])
    blocks = _events(text, events)

    def run(canary: bool) -> float:
        stages: list[ResponseStage] = [CanaryStage(
            "openai", lambda: Marker(keys, keys.code("acct-1")))] if canary else []
        driver = ResponseDriver(stages, 1 << 20)
        driver.start(200, _HEADERS)
        t0 = time.process_time()
        for i, block in enumerate(blocks):
            driver.body(block, i == len(blocks) - 1)
        return (time.process_time() - t0) / len(blocks) * 1e6

    run(True)
    plain = min(run(False) for _ in range(5))
    marked = min(run(True) for _ in range(5))
    density = {}
    for kind, docs in corpus.items():
        words = sites = changed = 0
        for i, doc in enumerate(docs):
            marker = Marker(keys, keys.code(f"acct-{i}"))
            marker.mark(doc)
            words += marker.stats.words
            sites += marker.stats.sites
            changed += marker.stats.changed
        density[kind] = {"sites_per_100_words": round(100 * sites / max(1, words), 2),
                         "words_changed": round(changed / max(1, words), 4)}
    return {"us_per_event_without_canary": round(plain, 2),
            "us_per_event_with_canary": round(marked, 2),
            "us_added_per_event": round(marked - plain, 2), "by_kind": density}


def _same_sentence(a: str, b: str) -> bool:
    """Whether two sentences are one sentence before and after marking, not two that a
    changed line split differently (marks change at most a few letters)."""
    la, lb = re.sub(r"[^a-z]", "", a.lower()), re.sub(r"[^a-z]", "", b.lower())
    return abs(len(la) - len(lb)) <= 6 and la[:6] == lb[:6]


def write_sample(keys: CanaryKeys, corpus: dict[str, list[str]], path: Path,
                 size: int) -> dict[str, object]:
    """``size`` sentences a mark changed, each beside its original in random order (A/B),
    the answers at the end of the file."""
    rng = random.Random(17)
    pairs: list[tuple[str, str, str]] = []
    for kind in ("technical_docs", "readmes", "assistant", "dialogue", "prose"):
        for i, doc in enumerate(corpus[kind]):
            marked = Marker(keys, keys.code(f"acct-{i}")).mark(doc)
            before, after = sentences(doc), sentences(marked)
            if len(before) == len(after):
                pairs += [(kind, a, b) for a, b in zip(before, after, strict=True)
                          if a != b and _same_sentence(a, b)]
    chosen = rng.sample(pairs, min(size, len(pairs)))
    lines = ["# Blind sample of marked sentences", "",
             "Each item shows one sentence twice: the original and the marked one, in random",
             "order. Judge each: can you tell which is the original, and does either read",
             "worse or mean something else? The answers are at the end.", ""]
    key = []
    for n, (kind, original, marked) in enumerate(chosen, 1):
        first_is_original = rng.random() < 0.5
        a, b = (original, marked) if first_is_original else (marked, original)
        lines += [f"{n}. ({kind})", f"   - A: {a}", f"   - B: {b}", ""]
        key.append(f"{n}: original is {'A' if first_is_original else 'B'}")
    lines += ["## Answers", "", *key, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return {"file": str(path), "pairs": len(chosen), "changed_sentences_found": len(pairs)}
