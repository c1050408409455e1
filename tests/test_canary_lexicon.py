"""The lexicon earns every pair: each context that sank a pair stays a regression test,
the pairs left are the documented categories, articles stay right, and the corpus the
audit ran on stays large and varied."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from bench.texts import CORPUS, documents, sentences
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.lexicon import (
    ARTICLE_SENSITIVE,
    CATEGORIES,
    INDEX,
    PAIRS,
    build_index,
    takes_an,
)
from guardproxy.canary.marker import Marker

KEYS = CanaryKeys("lexicon-test-secret-0123456789")
PAIR_SET = {frozenset(pair) for pair in PAIRS}
ACCOUNTS = [f"acct-{i}" for i in range(8)]


def rejected_rows() -> list[dict[str, str]]:
    with (CORPUS / "rejected_contexts.tsv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


ROWS = rejected_rows()


def count(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.I))


def has_word(text: str, word: str) -> bool:
    return count(text, word) > 0


def test_rejected_contexts_are_well_formed() -> None:
    assert len(ROWS) >= 100
    for row in ROWS:
        a, b = row["pair"].split("/")
        assert row["word"].lower() in (a, b), row
        assert has_word(row["sentence"], row["word"]), row
        assert row["why"].strip() and row["source"].strip(), row


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['pair']}:{r['word']}")
def test_rejected_pair_is_gone(row: dict[str, str]) -> None:
    assert frozenset(row["pair"].split("/")) not in PAIR_SET


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['pair']}:{r['word']}")
def test_rejected_substitution_never_happens(row: dict[str, str]) -> None:
    """Marked for any account, the context keeps both words of the
    rejected pair exactly as often as it had them."""
    sentence = row["sentence"]
    for account in ACCOUNTS:  # a kept pair is swapped for about half of them
        out = Marker(KEYS, KEYS.code(account)).mark(sentence)
        for word in row["pair"].split("/"):
            assert count(out, word) == count(sentence, word), (account, out)


@pytest.mark.parametrize("row", [r for r in ROWS if ":" in r["source"]
                                 and r["source"].split(":")[0] in ("assistant", "dialogue",
                                                                   "prose")])
def test_rejected_context_is_quoted_from_our_corpus(row: dict[str, str]) -> None:
    kind, name = row["source"].split(":", 1)
    path = CORPUS.parent / name if name == "prose.txt" else CORPUS / kind / name
    text = " ".join(path.read_text(encoding="utf-8").split())
    assert " ".join(row["sentence"].split()) in text


def test_pairs_are_the_documented_categories() -> None:
    assert tuple(pair for _, pairs in CATEGORIES for pair in pairs) == PAIRS
    categories = dict(CATEGORIES)
    # a new category needs its own structural check here before it can hold pairs
    assert set(categories) == {"indefinite pronoun", "-ward/-wards variant",
                               "concessive connective"}
    for a, b in categories["indefinite pronoun"]:
        assert a.endswith("one") and b == a[:-3] + "body"
    for a, b in categories["-ward/-wards variant"]:
        assert a.endswith("ward") and b == a + "s"
    for a, b in categories["concessive connective"]:
        assert a.endswith("theless") and b.endswith("theless")


def test_index_maps_each_word_to_its_pair() -> None:
    assert build_index((("x", "y"), ("p", "q"))) == {"x": (0, 0), "y": (0, 1),
                                                     "p": (1, 0), "q": (1, 1)}
    for i, (a, b) in enumerate(PAIRS):
        assert INDEX[a] == (i, 0) and INDEX[b] == (i, 1)


# Every lexicon word, classified by ear: is it written after "an"?
AN_WORDS = frozenset({"everyone", "everybody", "anyone", "anybody", "afterward",
                      "afterwards"})
A_WORDS = frozenset({"someone", "somebody", "toward", "towards", "nonetheless",
                     "nevertheless"})


def test_article_sensitive_pairs_are_those_said_with_different_articles() -> None:
    assert set(INDEX) <= AN_WORDS | A_WORDS, "classify new lexicon words by ear above"
    assert all(takes_an(word) == (word in AN_WORDS) for word in INDEX)
    said_differently = {i for i, (a, b) in enumerate(PAIRS) if (a in AN_WORDS) != (b in AN_WORDS)}
    assert said_differently == ARTICLE_SENSITIVE


def words(kind: str) -> int:
    return sum(len(doc.split()) for doc in documents(kind))


def test_our_corpus_is_large_and_plain_utf8() -> None:
    assert words("assistant") >= 25_000
    assert words("dialogue") >= 10_000
    assert words("prose") >= 10_000
    for path in CORPUS.rglob("*"):
        if path.is_file():
            assert "\r" not in path.read_bytes().decode("utf-8"), path
    with pytest.raises(KeyError):
        documents("poetry")


def test_technical_docs_are_many_and_deterministic() -> None:
    docs = documents("technical_docs")
    assert sum(len(d.split()) for d in docs) >= 150_000
    assert docs == documents("technical_docs")


def test_sentences_skip_code_and_keep_abbreviations() -> None:
    text = Path(CORPUS / "assistant" / "01_python_venv.md").read_text(encoding="utf-8")
    got = sentences(text)
    assert "That's it." in got
    assert not any("activate it (macOS / Linux)" in s for s in got)  # fenced code
    assert not any("source .venv/bin/activate" in s for s in got)  # only inline code
    assert sentences("Use a tool, e.g. Ruff. It is fast!\n\n| a | b |\n\n- One item. Two.") \
        == ["Use a tool, e.g. Ruff.", "It is fast!", "One item.", "Two."]
    assert sentences("server:\n  host: 0.0.0.0\ndebug: false\n\nIt starts.") == ["It starts."]
