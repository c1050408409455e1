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
from guardproxy.canary.lexicon import ARTICLE_SENSITIVE, INDEX, PAIRS, takes_an
from guardproxy.canary.marker import Marker
from guardproxy.canary.stats import log10_p
from tests.canary_forms import normal_form

PROSE = (Path(__file__).parent / "data" / "prose.txt").read_text()
KEYS = CanaryKeys("test-secret-0123456789")
WORDS = [w for pair in PAIRS for w in pair]


def canonical(text: str) -> str:
    """Equal iff only choices a canary channel makes differ."""
    return normal_form(text)


def mark(text: str, account: str = "alice", **kw: object) -> str:
    return Marker(KEYS, KEYS.code(account), **kw).mark(text)  # type: ignore[arg-type]


def test_marks_change_only_channel_choices_and_few_words() -> None:
    changed = 0
    paths = sorted((Path(__file__).parent / "data" / "corpus" / "assistant").glob("*.md"))
    for path in paths:
        text = path.read_text()
        marker = Marker(KEYS, KEYS.code("alice"))
        out = marker.mark(text)
        changed += out != text
        assert canonical(out) == canonical(text)
        assert marker.stats.changed_share <= 0.05, marker.stats
    assert changed >= 0.8 * len(paths)


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
