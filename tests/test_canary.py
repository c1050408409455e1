"""Output canaries: marks never touch what must stay exact, streams and whole texts
agree, and detection names the account with an honest p-value."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.corpus import prose
from guardproxy.canary.detect import account_bits, detect, observe, position_votes, score_code
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.ledger import simhash64
from guardproxy.canary.lexicon import ARTICLE_SENSITIVE, INDEX, PAIRS, takes_an
from guardproxy.canary.marker import Marker
from guardproxy.canary.stats import log10_p

PROSE = (Path(__file__).parent / "data" / "prose.txt").read_text()
KEYS = CanaryKeys("test-secret-0123456789")
WORDS = [w for pair in PAIRS for w in pair]


def canonical(text: str) -> str:
    """Every lexicon word replaced by its pair: equal iff only lexical choices differ."""
    def sub(m: re.Match[str]) -> str:
        entry = INDEX.get(m.group().lower())
        return f"<{entry[0]}>" if entry else m.group()
    return re.sub(r"[A-Za-z]+", sub, text)


def mark(text: str, account: str = "alice", **kw: object) -> str:
    return Marker(KEYS, KEYS.code(account), **kw).mark(text)  # type: ignore[arg-type]


def test_marks_change_only_lexical_choices_and_few_words() -> None:
    marker = Marker(KEYS, KEYS.code("alice"))
    out = marker.mark(PROSE)
    assert out != PROSE
    assert canonical(out) == canonical(PROSE)
    assert marker.stats.sites >= 10
    assert marker.stats.changed_share <= 0.05, marker.stats


def test_deterministic_per_key_and_account() -> None:
    assert mark(PROSE) == mark(PROSE)
    assert mark(PROSE, "bob") != mark(PROSE)
    assert Marker(CanaryKeys("another-secret-abcdef"), 1).mark(PROSE) != mark(PROSE)


def test_lexicon_words_are_plain_and_each_in_one_pair() -> None:
    assert len(WORDS) == len(set(WORDS)) == len(INDEX)
    assert all(re.fullmatch(r"[a-z]+", w) for w in WORDS)
    assert all(a != b for a, b in PAIRS)


def test_no_article_mismatch_after_a_or_an() -> None:
    for index in ARTICLE_SENSITIVE:
        for word in PAIRS[index]:
            article = "an" if takes_an(word) else "a"
            for account in ("alice", "bob", "carol", "dave"):
                sentence = f"It was {article} {word} result, and {article.upper()} {word} one."
                out = mark(sentence, account)
                assert out == sentence, (word, out)
    assert not takes_an("useful") and takes_an("enormous") and not takes_an("usually")


protected = st.sampled_from([
    "\n```python\nx = 'big large often frequently'\n```\n",
    "`often quickly` ", "https://example.com/often/quickly?x=large ", "3.14 ", "v2often ",
    "\n    indented often quickly code\n", "user@often.example ",
])
prose_word = st.sampled_from([*WORDS, "the", "and", "of", "a", "to", "Often", "QUICKLY"])
fragment = st.one_of(protected, prose_word.map(lambda w: w + " "),
                     st.sampled_from(["\n", ". ", ", ", "\n\n"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(fragment, min_size=1, max_size=60))
def test_protected_spans_come_out_byte_identical(parts: list[str]) -> None:
    text = "".join(parts)
    out = mark(text)
    assert canonical(out) == canonical(text)
    for part in parts:
        if part.strip() and part not in ("\n", ". ", ", ") and part.strip() not in WORDS \
                and part.strip().lower() not in WORDS:
            assert part.strip() in out, part


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(PROSE)), max_size=30))
def test_stream_and_whole_text_get_the_same_marks(cuts: list[int]) -> None:
    marker = Marker(KEYS, KEYS.code("alice"))
    points = sorted({0, len(PROSE), *cuts})
    streamed = "".join(marker.feed(PROSE[a:b]) for a, b in itertools.pairwise(points))
    assert streamed + marker.flush() == mark(PROSE)


def test_no_new_stop_sequence_match() -> None:
    words = [w for w in WORDS if w in PROSE.lower().split()]
    pair = PAIRS[INDEX[words[0]][0]]
    stop = f" {pair[1 - INDEX[words[0]][1]]}"
    out = Marker(KEYS, KEYS.code("alice"), stops=[stop]).mark(PROSE)
    assert (stop in out) == (stop in PROSE)


def test_tripwire_is_invisible_and_attributes_verbatim_copies() -> None:
    out = mark(PROSE, tripwire=True)
    assert "\u200b" in out or "\u200c" in out
    assert out.replace("\u200b", "").replace("\u200c", "") == mark(PROSE)


def test_detect_names_the_account_and_not_unmarked_text() -> None:
    accounts = [f"acct-{i}" for i in range(1000)] + ["alice", "bob"]
    text = prose(3000, seed=1)
    verdict = detect(KEYS, [mark(text)], accounts, null_keys=200)
    assert verdict.global_score.log10_p < -6
    assert verdict.accounts[0].account == "alice"
    assert verdict.accounts[0].log10_p_bonferroni < -6
    assert verdict.null_exceed == 0.0
    assert not verdict.mixed
    clean = detect(KEYS, [text], accounts, null_keys=200)
    assert clean.global_score.log10_p > -3
    assert all(a.log10_p_bonferroni > -3 for a in clean.accounts)
    # the empirical null agrees with the exact test: random keys rarely look marked
    assert clean.null_exceed > 0.001


def test_detect_reports_mixed_sources() -> None:
    docs = [mark(prose(1500, seed=i), "alice" if i % 2 else "bob") for i in range(4)]
    verdict = detect(KEYS, docs, ["alice", "bob", "carol"], null_keys=0)
    named = {a.account for a in verdict.accounts if a.log10_p_bonferroni < -6}
    assert named == {"alice", "bob"}
    assert verdict.mixed


def test_accounts_sharing_a_tag_are_told_apart_by_check_bits() -> None:
    seen: dict[int, str] = {}
    for i in itertools.count():
        account = f"c-{i}"
        if (tag := KEYS.tag(account)) in seen:
            twin = seen[tag]
            break
        seen[tag] = account
    verdict = detect(KEYS, [mark(prose(3000, seed=2), account)],
                     [twin, account, "alice"], null_keys=0)
    top, second = verdict.accounts[:2]
    assert top.account == account and top.known_accounts == 3
    assert top.log10_p_bonferroni < -6 and second.account == twin
    assert second.log10_p_bonferroni > -3, "the twin only shares the lookup tag"
    assert not verdict.mixed


def test_attribution_p_value_is_honest_against_other_accounts() -> None:
    """Text from one account, scored as if it came from each of many others: the share
    of accounts reaching p < alpha must stay at or below alpha."""
    text = mark(prose(3000, seed=5), "alice")
    bits = account_bits(KEYS, observe([text])[0])
    majority = position_votes(bits)
    assert len(majority) > 60
    others = [f"other-{i}" for i in range(2000)]
    p_values = [log10_p(score_code(majority, KEYS.code(o)), len(majority)) for o in others]
    assert sum(p < -2 for p in p_values) <= 2000 * 0.01 * 2
    assert sum(p < -1 for p in p_values) <= 2000 * 0.1 * 1.3
    assert min(p_values) > -6


def simhash_reference(text: str) -> int:
    """The textbook SimHash, bit by bit: what the fast one must equal."""
    import hashlib

    words = re.findall(r"[a-z0-9]+", text.lower())
    shingles = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)] \
        if len(words) >= 3 else words
    weights = [0] * 64
    for shingle in shingles:
        h = int.from_bytes(hashlib.blake2b(shingle.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if h >> bit & 1 else -1
    return sum(1 << bit for bit in range(64) if weights[bit] > 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*WORDS[:40], "the", "code", "42", "a"]), max_size=300))
def test_simhash_equals_the_reference(words: list[str]) -> None:
    text = " ".join(words)
    assert simhash64(text) == simhash_reference(text)


def test_simhash_is_close_for_near_copies_and_far_otherwise() -> None:
    a, b = prose(300, seed=3), prose(300, seed=4)
    edited = a.replace(" the ", " a ", 3)
    assert (simhash64(a) ^ simhash64(edited)).bit_count() <= 6
    assert (simhash64(a) ^ simhash64(b)).bit_count() > 16


async def test_ledger_matches_pasted_lines_and_single_paragraphs() -> None:
    from guardproxy.canary.ledger import LedgerEntry, MemoryLedger, match, paragraph_hashes

    ledger = MemoryLedger(100)
    answers = [" ".join(prose(120, seed=20 + i).split()) for i in range(3)]  # one line each
    two_part = prose(80, seed=30) + "\n\n" + prose(80, seed=31)
    for i, text in enumerate([*answers, two_part]):
        await ledger.record(LedgerEntry(simhash64(text), f"acct-{i}", f"req-{i}", 0.0,
                                        len(text.split()), paragraph_hashes(text)))
    pasted = "\n".join(answers)  # several answers, one per line: no blank lines
    found = await match(ledger, pasted)
    assert {(m.piece, m.entry.account) for m in found if m.distance == 0} >= {
        (1, "acct-0"), (2, "acct-1"), (3, "acct-2")}
    second_paragraph = two_part.split("\n\n")[1]
    hits = await match(ledger, "Intro.\n\n" + second_paragraph)
    assert [m.entry.account for m in hits if m.distance == 0] == ["acct-3"]
    assert not await match(ledger, prose(120, seed=99))
