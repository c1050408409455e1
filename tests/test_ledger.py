"""The output ledger's fingerprints and matching: every leak shape of >= 50 copied words
is found in the response it came from, unrelated text is not, and p is honest."""

from __future__ import annotations

import math
import random
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.corpus import prose
from guardproxy.canary.fingerprint import (
    DEFAULT,
    T_WORDS,
    Fingerprinter,
    K,
    W,
    winnow,
    words,
)
from guardproxy.canary.ledger import (
    LedgerEntry,
    MemoryLedger,
    ledger_entry,
    log10_poisson_tail,
    match,
    parse_max_age,
)
from guardproxy.canary.lexicon import INDEX, PAIRS

ANSWERS = (Path(__file__).parent / "data" / "ledger_answers.md").read_text().split("\n=====\n")
RECORDED = ANSWERS[:6]      # six technical answers, two on each of three topics
UNRELATED = ANSWERS[6]      # a seventh on the topic of the first, never recorded
NOW = 2_000_000_000.0


async def ledger_of(texts: list[str], max_entries: int = 1000) -> MemoryLedger:
    ledger = MemoryLedger(max_entries)
    for i, text in enumerate(texts):
        await ledger.record(ledger_entry(text, f"acct-{i}", f"req-{i}", NOW - 100 + i))
    return ledger


async def found(ledger: MemoryLedger, leak: str) -> list[str]:
    return [m.entry.request_id for m in await match(ledger, leak, now=NOW)]


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", " ".join(text.split()))


def strip_markdown(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"^\s*(?:#+|[-*+]|\d+[.)])\s+", "", text, flags=re.M)
    return re.sub(r"[*_`]", "", text)


# -- normalisation ------------------------------------------------------------------

def test_layout_case_markdown_and_typography_do_not_change_the_words() -> None:
    one, other = PAIRS[0]  # a lexicon pair: the canary's choice does not count either
    plain = f"It doesn't matter - the cache said \"no\" {one}, see the docs. Then stop."
    dressed = (f"IT  DOES NOT\nmatter — the *cache* said “no” **{other.upper()}**,\n"
               "see [the docs](https://example.com/x.y). then   stop.")
    assert words(plain).tokens == words(dressed).tokens
    assert words(plain).sentences == words(dressed).sentences == (0, 12)


def test_lexicon_choices_and_contractions_normalise_to_one_form() -> None:
    for word, (pair, _) in INDEX.items():
        assert words(word).tokens == words(min(PAIRS[pair])).tokens
    assert words("can't won\u2019t isn't cannot").tokens == (
        "can", "not", "will", "not", "is", "not", "can", "not")


def test_unicode_forms_zero_width_marks_and_list_numbers() -> None:
    dressed = "\ufb01le \uff26\uff55\uff4c\uff4c cafe\u0301 wo\u200brd"
    assert words(dressed).tokens == \
        words("file full café word").tokens
    assert words("東京に").tokens == ("東", "京", "に")
    # "1." and "1)" render alike (a markdown mark channel) and neither ends a sentence
    assert words("Intro\n1. first item\n2. second").sentences == \
        words("Intro\n1) first item\n2) second").sentences == (0,)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Cé.'\u2019\u200b\n-*_1)\ufb01東½")),
               max_size=80))
def test_spans_and_the_fast_path_read_the_same_words(text: str) -> None:
    fast, slow = words(text), words(text, spans=True)
    assert (fast.tokens, fast.sentences) == (slow.tokens, slow.sentences)
    assert len(slow.spans) == len(slow.tokens)


# -- winnowing ----------------------------------------------------------------------

def reference_winnow(hashes: list[int], w: int) -> set[int]:
    """Robust winnowing by its definition: per window, the previous choice while it is
    still a minimum inside, else the rightmost minimum."""
    chosen: set[int] = set()
    previous = -1
    for start in range(max(1, len(hashes) - w + 1)):
        window = range(start, min(len(hashes), start + w))
        low = min(hashes[i] for i in window)
        if previous in window and hashes[previous] == low:
            continue
        previous = max(i for i in window if hashes[i] == low)
        chosen.add(previous)
    return chosen


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=60), st.integers(1, 8))
def test_winnow_equals_its_definition(hashes: list[int], w: int) -> None:
    assert set(winnow(hashes, w)) == (reference_winnow(hashes, w) if hashes else set())


def test_parameters_state_the_guarantee() -> None:
    assert (K, W, T_WORDS) == (8, 43, 50) and DEFAULT.guarantee == T_WORDS == W + K - 1


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**9))
def test_any_shared_run_of_t_words_is_found_and_shorter_noise_never(seed: int) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]

    def text(n: int) -> list[str]:
        return [rng.choice(vocab) for _ in range(n)]

    run = text(T_WORDS)
    a, b = text(rng.randrange(0, 120)) + run + text(rng.randrange(0, 120)), \
        text(rng.randrange(0, 120)) + run + text(rng.randrange(0, 120))
    fa, fb = (set(DEFAULT.fingerprints(" ".join(x)).hashes) for x in (a, b))
    assert fa & fb, "a shared run of t words always shares a fingerprint"
    noise = text(K - 1)
    c, d = text(60) + noise + text(60), text(60) + noise + text(60)
    fc, fd = (set(DEFAULT.fingerprints(" ".join(x)).hashes) for x in (c, d))
    assert not fc & fd, "a shared run shorter than k words never does"


def test_thirty_word_excerpts_are_not_promised_sixty_word_ones_are() -> None:
    text = " ".join(prose(3000, seed=5).split())  # one line: no sentence help
    plain = re.sub(r"[.!?]", "", text).split()
    whole = set(DEFAULT.fingerprints(" ".join(plain)).hashes)
    hits = {n: [bool(set(DEFAULT.fingerprints(" ".join(plain[i:i + n])).hashes) & whole)
                for i in range(0, len(plain) - n, 7)] for n in (30, 60)}
    assert all(hits[60]), "every 60-word excerpt is found"
    assert not all(hits[30]), "30 words is below the guarantee: some excerpts are missed"


def test_storage_is_about_seventy_fingerprints_per_thousand_words() -> None:
    prints = DEFAULT.fingerprints(" ".join(RECORDED))
    per_1000 = 1000 * len(prints.hashes) / prints.words
    assert 2000 / (W + 1) <= per_1000 <= 100, per_1000


# -- leak shapes --------------------------------------------------------------------

async def test_several_answers_pasted_onto_one_line() -> None:
    ledger = await ledger_of(RECORDED)
    leak = " ".join(" ".join(RECORDED[i].split()) for i in (1, 3, 5))
    assert set(await found(ledger, leak)) == {"req-1", "req-3", "req-5"}


@pytest.mark.parametrize("source", range(6))
async def test_every_other_sentence_copied(source: int) -> None:
    ledger = await ledger_of(RECORDED)
    for start in (0, 1):
        leak = " ".join(sentences(RECORDED[source])[start::2])
        assert (await found(ledger, leak))[:1] == [f"req-{source}"]


async def test_a_sixty_word_excerpt_from_the_middle() -> None:
    ledger = await ledger_of(RECORDED)
    for source in range(6):
        words_ = RECORDED[source].split()
        middle = len(words_) // 2
        leak = "Someone posted this:\n" + " ".join(words_[middle:middle + 60]) + " ...end"
        assert (await found(ledger, leak))[:1] == [f"req-{source}"]


async def test_rewrapped_recased_and_markdown_stripped() -> None:
    ledger = await ledger_of(RECORDED)
    for source in range(6):
        text = RECORDED[source]
        for leak in (textwrap.fill(" ".join(text.split()), width=37).upper(),
                     strip_markdown(text),
                     text.replace("\n", "\r\n").replace("\u2019", "'").replace("—", "--")):
            assert (await found(ledger, leak))[:1] == [f"req-{source}"]


async def test_rerandomised_lexicon_words_change_nothing() -> None:
    rng = random.Random(4)
    marked = re.sub(r"(\w+) (\w+) ", lambda m: f"{m.group()}{rng.choice(PAIRS)[0]} "
                    if rng.random() < 0.3 else m.group(), RECORDED[4])
    ledger = await ledger_of([*RECORDED[:4], marked, RECORDED[5]])

    def swap(m: re.Match[str]) -> str:
        entry = INDEX.get(m.group().lower())
        return PAIRS[entry[0]][1 - entry[1]] if entry else m.group()

    leak = re.sub(r"[A-Za-z]+", swap, marked)
    assert leak != marked and leak.split() != marked.split()
    assert (await found(ledger, leak))[:1] == ["req-4"]


async def test_unrelated_text_on_the_same_topic_matches_nothing() -> None:
    ledger = await ledger_of(RECORDED)
    assert await found(ledger, UNRELATED) == []
    assert await found(ledger, prose(500, seed=99)) == []


async def test_match_reports_spans_excerpt_and_time() -> None:
    ledger = await ledger_of(RECORDED)
    words_ = " ".join(RECORDED[2].split()).split()
    leak = " ".join(prose(100, seed=1).split() + words_[100:200] + prose(100, seed=2).split())
    (m,) = await match(ledger, leak, now=NOW)
    row = m.as_dict()
    assert (row["account"], row["request_id"], row["request"]) == ("acct-2", "req-2", "req-2")
    assert row["time"] == NOW - 100 + 2 and row["response_words"] == len(words(RECORDED[2]).tokens)
    start, end = row["leak_span"]
    assert 100 <= start < end <= 200 + K and row["matched_words"] >= 60
    r_start, r_end = row["response_span"]
    assert 80 <= r_start < r_end <= 260
    assert str(row["excerpt"]).split()[0] in words_[100:200], "whole words of the leak"
    assert row["shared"] >= 2 and row["log10_p"] <= row["log10_p_ledger"] + 1e-9


async def test_stale_entries_are_not_reported() -> None:
    ledger = MemoryLedger(100, max_age=60.0)
    await ledger.record(ledger_entry(RECORDED[0], "a", "r", NOW - 30))
    assert await found(ledger, RECORDED[0]) == ["r"]
    assert [m.entry for m in await match(ledger, RECORDED[0], now=NOW + 31)] == []


# -- p of a chance match ------------------------------------------------------------

def poisson_binomial_tail(qs: list[float], s: int) -> float:
    dist = [1.0]
    for q in qs:
        dist = [a * (1 - q) + b * q for a, b in zip([*dist, 0.0], [0.0, *dist], strict=True)]
    return sum(dist[s:])


@pytest.mark.parametrize(("lam", "s"), [(0.001, 1), (0.5, 3), (2.0, 2), (3.0, 12), (40.0, 60)])
def test_poisson_tail_is_exact(lam: float, s: int) -> None:
    exact = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(s))
    assert math.isclose(10 ** log10_poisson_tail(lam, s), exact, rel_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0001, 0.3), min_size=1, max_size=30), st.integers(1, 8))
def test_poisson_tail_bounds_the_exact_chance(qs: list[float], s: int) -> None:
    if s >= sum(qs) + 1:  # Anderson & Samuels: the Poisson tail is the larger one
        assert poisson_binomial_tail(qs, s) <= 10 ** log10_poisson_tail(sum(qs), s) * (1 + 1e-9)


async def test_common_boilerplate_is_weak_evidence_and_a_copy_strong() -> None:
    boiler = ("I hope this explanation helps you with your project. Let me know if you have "
              "any other questions about this topic or need more examples of the code.")
    texts = [prose(200, seed=100 + i) + ("\n\n" + boiler if i % 2 else "") for i in range(400)]
    ledger = await ledger_of(texts)
    chance = await match(ledger, prose(300, seed=7) + "\n\n" + boiler, now=NOW)
    assert chance and all(m.log10_p_ledger > -1 for m in chance), "a shared phrase is no proof"
    copy = " ".join(" ".join(texts[17].split()).split()[50:150])
    best = (await match(ledger, copy, now=NOW))[0]
    assert best.entry.request_id == "req-17" and best.log10_p_ledger < -6


async def test_an_empty_ledger_and_a_short_leak_match_nothing() -> None:
    assert await match(MemoryLedger(10), RECORDED[0]) == []
    ledger = await ledger_of(RECORDED)
    assert await found(ledger, "too short") == []


def test_entries_round_trip_through_json() -> None:
    entry = ledger_entry(RECORDED[3], "acct", "req", 12.5)
    assert LedgerEntry.from_json(entry.to_json()) == entry
    assert entry.words == len(words(RECORDED[3]).tokens)
    assert len(entry.fingerprints) == len(set(entry.fingerprints)) == len(entry.positions)


def test_max_age_accepts_days_and_policy_durations() -> None:
    assert parse_max_age("90d") == 90 * 86400 and parse_max_age("36h") == 36 * 3600
    for bad in ("0d", "4000d", "soon", -5):
        with pytest.raises(ValueError):
            parse_max_age(bad)


def test_a_custom_fingerprinter_keeps_its_guarantee() -> None:
    assert Fingerprinter(k=5, w=10).guarantee == 14
