"""Marks never change meaning: code, identifiers, data and markup come out byte-identical,
markdown renders the same, and every channel only swaps its own two variants."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.lexicon import INDEX, PAIRS
from guardproxy.canary.marker import Marker
from guardproxy.canary.slots import CHANNELS, CONTRACTION, LEXICAL, MARKDOWN, TYPOGRAPHY
from guardproxy.canary.text import Scanner, read_slots
from tests.canary_forms import normal_form

KEYS = CanaryKeys("test-secret-meaning-0123456789")
ACCOUNTS = [f"acct-{i}" for i in range(8)]
WORDS = sorted(INDEX)
PROSE = (Path(__file__).parent / "data" / "prose.txt").read_text()
COMMONMARK = MarkdownIt("commonmark")


def mark(text: str, account: str = "acct-0", channels: tuple[str, ...] = CHANNELS) -> str:
    return Marker(KEYS, KEYS.code(account), channels=channels).mark(text)


word = st.sampled_from(WORDS)
ident = st.sampled_from(["acquire()", "select(2)", "os.path", "fooBar", "snake_case",
                         "std::move", "obj.options", "HTTPServer", "__init__", "$HOME",
                         "src/main.py", "a->b", "x=1", "<div>", "#include", "50%"])


@st.composite
def protected_fragment(draw: st.DrawFn) -> str:
    w = [draw(word) for _ in range(3)]
    kind = draw(st.integers(0, 13))
    return [
        f"{w[0]} {draw(ident)} {w[1]}",                      # identifier neighbours
        f"`{w[0]} {w[1]}`",                                   # code span
        f"``{w[0]} `{w[1]}` {w[2]}``",                        # double-backtick span
        f'"{w[0]} {w[1]}"',                                   # quoted
        f"[{w[0]} {w[1]}](https://example.com/{w[2]})",       # link text
        f"\n\n{w[0]}: {w[1]} {w[2]}\n\n",                     # key-value line
        f'\n\n{{"{w[0]}": ["{w[1]}", {{"{w[2]}": 1}}]}}\n\n',  # JSON, unfenced
        f"\n\n| {w[0]} | {w[1]} |\n|---|---|\n| {w[2]} | x |\n\n",   # table
        f"\n\n{w[0]} = {w[1]} {w[2]}\n\n",                    # assignment
        f"\n\n{w[0]}\t{w[1]}\t{w[2]}\n\n",                   # tab-separated
        f"\n\n```\n{w[0]} {w[1]} {w[2]}\n```\n\n",            # fenced code
        f"\n\n    {w[0]} {w[1]} {w[2]}\n\n",                  # indented code
        f"the {w[0].capitalize()} {w[1].capitalize()} service",  # names mid-sentence
        f"{w[0]}_{w[1]} {w[2].upper()}",                      # snake case, constants
    ][kind]


prose_part = st.one_of(word, st.sampled_from(["the", "and", "it", "is", "we", "a", ".",
                                              ",", "\n", "\n\n", "- item", "1. step"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(protected_fragment().map(lambda f: (True, f)),
                          prose_part.map(lambda p: (False, p))), min_size=1, max_size=40),
       st.sampled_from(ACCOUNTS))
def test_code_identifiers_and_data_come_out_byte_identical(parts: list[tuple[bool, str]],
                                                           account: str) -> None:
    text = " ".join(part for _, part in parts)
    out = mark(text, account)
    for protected, part in parts:
        if protected:
            assert part.strip() in out, (part, out)


@pytest.mark.parametrize("text", [
    "The worker stays blocked in acquire() until the lock is free.",
    "Use select or poll(2) to wait.",
    'The config is {"options": {"often": true}} here.',
    "Use ``often quickly`` or `options` here.",
    "Call fooBar often and often fooBar.",
    "options: often\nand then",
    "options:\n  - often\n  - quickly\n",
])
def test_reported_changes_of_meaning_stay_unchanged(text: str) -> None:
    for account in ACCOUNTS:
        marked = mark(text, account, channels=(LEXICAL,))
        assert marked == text, marked


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.one_of(word, st.integers(), st.booleans()),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(word, inner, max_size=4)),
                    max_leaves=12).filter(lambda v: isinstance(v, dict | list)),
       st.sampled_from([None, 2]), st.sampled_from(ACCOUNTS))
def test_json_and_yaml_in_an_answer_parse_the_same(value: object, indent: int | None,
                                                   account: str) -> None:
    for data in (json.dumps(value, indent=indent),
                 yaml.safe_dump(value, default_flow_style=False)):
        text = f"Here is often the result:\n\n{data}\n\nIt is often useful."
        out = mark(text, account)
        start = out.index("\n\n") + 2
        block = out[start:start + len(data)]
        assert block == data


# -- markdown renders the same -------------------------------------------------------

markdown_doc = st.lists(st.sampled_from([
    "- {w} one\n- {w} two\n- three {w}\n",
    "* {w} one\n* two\n\n  continued {w}\n* three\n",
    "1. {w} first\n2. second\n3. third {w}\n",
    "1) {w} first\n2) second {w}\n",
    "- outer {w}\n  - inner {w}\n  - inner two\n- outer two\n",
    "- a\n    - nested {w}\n    - nested two\n- b\n",
    "**{w}** and *{w}* and **{w}:** done.\n",
    "A **{w} phrase** and *{w}*, then (**{w}**).\n",
    "# {w} heading\n",
    "{w} line\n-\n",                 # setext heading underline
    "- - -\n", "* * *\n", "***\n", "---\n",
    "2024. That year {w} changed.\n",
    "Text {w}\n- item right after text\n- item two\n",
    "+ plus {w}\n+ plus two\n",
    "- empty next\n-\n- after\n",
    "> quoted {w}\n> more\n",
    "```\n- not a list {w}\n```\n",
]), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(markdown_doc, st.lists(word, min_size=20, max_size=20), st.sampled_from(ACCOUNTS),
       st.sampled_from(["\n", "\n\n"]))
def test_markdown_marks_render_identically(blocks: list[str], words: list[str],
                                           account: str, sep: str) -> None:
    fill = iter(words * 4)
    text = sep.join(b.replace("{w}", next(fill), 1).replace("{w}", next(fill))
                    for b in blocks)
    out = mark(text, account, channels=(MARKDOWN,))
    assert COMMONMARK.render(out) == COMMONMARK.render(text), (text, out)


def test_markdown_channel_marks_lists_and_emphasis() -> None:
    text = "\n\n".join(
        f"Part {i} says {w}.\n\n- the {w} one\n- the next two\n\n1. first {w} step\n"
        f"2. second step\n\nSome **{w}** here." for i, w in enumerate(WORDS[:12]))
    outs = {mark(text, a, channels=(MARKDOWN,)) for a in ACCOUNTS}
    assert len(outs) > 1 and text not in outs
    for out in outs:
        for part in out.split("Part ")[1:]:   # each list keeps one style
            assert len(set(re.findall(r"^([-*]) ", part, re.M))) == 1
            assert len(set(re.findall(r"^\d([.)]) ", part, re.M))) == 1
        assert COMMONMARK.render(out) == COMMONMARK.render(text)


def test_typography_swaps_only_apostrophes_inside_words() -> None:
    text = ("It's what we don't know, isn't it? The user's 'quoted' word and "
            "rock 'n' roll, `don't` and it\u2019s.\n")
    outs = {mark(text, a, channels=(TYPOGRAPHY,)) for a in ACCOUNTS}
    assert len(outs) > 1
    for out in outs:
        assert out.replace("\u2019", "'") == text.replace("\u2019", "'")
        assert "'quoted'" in out and "`don't`" in out and "'n'" in out


def test_lexical_marks_swap_only_lexicon_words() -> None:
    for account in ACCOUNTS:
        out = mark(PROSE, account, channels=(LEXICAL,))
        a, b = re.findall(r"[A-Za-z]+|[^A-Za-z]+", PROSE), re.findall(r"[A-Za-z]+|[^A-Za-z]+",
                                                                       out)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if x != y:
                assert INDEX[x.lower()][0] == INDEX[y.lower()][0], (x, y)


MIXED = PROSE + "\n\n" + "\n\n".join([
    "Here's a **quick** list:\n\n- it's often simple\n- don't rush\n\n1. first\n2. second",
    "The `often` option and acquire() are often used; 'quoted often' stays.",
    "It does not stop, and we cannot wait. It won't fit and it isn't small. Do not call it.",
])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(MIXED)), st.integers(0, 2000), st.sampled_from(ACCOUNTS))
def test_every_channel_keeps_the_normal_form(start: int, size: int, account: str) -> None:
    text = MIXED[start:start + size]
    assert normal_form(mark(text, account)) == normal_form(text)


@pytest.mark.parametrize("text", [
    "It works, doesn't it?", "Isn't it great?", "Doesn't the cache expire?",
    "Check that x is not None first.", "Return True if x is not y.",
    "We want to do not much.", "They would have not seen it.", "It is *not* fine.",
    "You can not go if you prefer.", "Had it not rained, we would go.",
    "Is not the answer clear?", "IT DOES NOT WORK.", "Aren't there any?",
    "They weren't there.",
])
def test_contractions_that_would_change_grammar_are_left_alone(text: str) -> None:
    assert not [s for s in read_slots(text) if s.channel == CONTRACTION], text
    for account in ACCOUNTS:
        assert mark(text, account, channels=(CONTRACTION,)) == text


@pytest.mark.parametrize(("text", "other"), [
    ("It does not work.", "It doesn't work."), ("We cannot wait.", "We can't wait."),
    ("It will not fit.", "It won't fit."), ("Do not call it.", "Don't call it."),
    ("They were not home, (and he had not left).", "They weren't home, (and he hadn't left)."),
    ("It is not.", "It isn't."),
])
def test_contraction_sites_read_the_same_in_either_form(text: str, other: str) -> None:
    mine = [(s.context, s.member) for s in read_slots(text) if s.channel == CONTRACTION]
    theirs = [(s.context, s.member) for s in read_slots(other) if s.channel == CONTRACTION]
    assert mine and [c for c, _ in mine] == [c for c, _ in theirs]
    assert all(m == 0 for _, m in mine) and all(m == 1 for _, m in theirs)
    for account in ACCOUNTS:
        assert normal_form(mark(text, account, channels=(CONTRACTION,))) == normal_form(text)
        assert normal_form(mark(other, account, channels=(CONTRACTION,))) == normal_form(text)



@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=30))
def test_every_channel_marks_a_stream_as_the_whole_text(cuts: list[int]) -> None:
    marker = Marker(KEYS, KEYS.code("acct-1"))
    points = sorted({0, len(MIXED), *cuts})
    streamed = "".join(marker.feed(MIXED[a:b]) for a, b in itertools.pairwise(points))
    assert streamed + marker.flush() == mark(MIXED, "acct-1")


def test_channel_choices_never_move_another_slot() -> None:
    """Every variant a mark writes leaves every other slot's context unchanged."""
    def slots(text: str) -> dict[bytes, str]:
        return {s.context: s.channel for u in Scanner().feed(text, final=True)
                for s in (u.slots or ()) if s.context}
    original = slots(MIXED)
    for account in ACCOUNTS:
        marked = slots(mark(MIXED, account))
        assert set(marked) <= set(original)
        # only an emphasis switched to underscores may hide slots, never add or move one
        assert all(original[c] == ch for c, ch in marked.items())


def test_stop_sequences_with_a_variant_turn_that_channel_off() -> None:
    text = "It's what we don't know.\n\n- one\n- two\n"
    for account in ACCOUNTS:
        out = Marker(KEYS, KEYS.code(account), stops=["\u2019", "*"]).mark(text)
        assert "\u2019" not in out and "*" not in out


def test_every_pair_has_two_distinct_plain_words() -> None:
    assert all(a != b and a.isalpha() and b.isalpha() for a, b in PAIRS)


def _apostrophe_styles(text: str) -> list[set[str]]:
    """Per paragraph, the apostrophes inside prose words (contractions included)."""
    out: list[set[str]] = [set()]
    for unit in Scanner().feed(text, final=True):
        if "\n\n" in unit.text:
            out.append(set())
        if unit.prose or any(s.channel == TYPOGRAPHY for s in unit.slots or ()):
            out[-1] |= {c for c in unit.text if c in "'\u2019"}
    return out


@pytest.mark.parametrize("kind", ["assistant", "dialogue", "prose"])
def test_a_paragraph_never_mixes_apostrophe_styles(kind: str) -> None:
    """Prose, speech in double quotes and contractions follow one style per paragraph
    (the blind judge's one complaint was a mix)."""
    folder = Path(__file__).parent / "data" / "corpus" / kind
    for path in sorted(folder.glob("*.md")):
        text = path.read_text()
        for account in ACCOUNTS[:4]:
            marked = mark(text, account)
            for before, after in zip(_apostrophe_styles(text), _apostrophe_styles(marked),
                                     strict=False):
                if len(before) <= 1:
                    assert len(after) <= 1, (path.name, account)


@pytest.mark.parametrize("text", ["\xad", "-\u200b item\n- two", "\u200bhello there",
                                  "a \xad b", "# \xadTitle\n", "it\u2060 does\u2060 not"])
def test_invisible_characters_are_never_lost(text: str) -> None:
    for account in ACCOUNTS:
        out = mark(text, account)
        for c in "\xad\u200b\u2060":
            assert out.count(c) == text.count(c), (text, out)
