"""Attacks on the output canaries that succeed today: each test states the promise (README,
"output canaries": "Mark channels" and "What is never changed") and fails on the
smallest input found. The few still marked xfail(strict) are known limitations the README states."""

from __future__ import annotations

import itertools

import pytest
from markdown_it import MarkdownIt

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.slots import CHANNELS, CONTRACTION, LEXICAL, MARKDOWN, TYPOGRAPHY
from guardproxy.canary.text import Scanner

COMMONMARK = MarkdownIt("commonmark")
# a site's choice is global (the same for every account) half of the time: several
# secrets make every site take both variants somewhere
KEYS = [CanaryKeys(f"attack-findings-secret-{i:02d}") for i in range(6)]
ACCOUNTS = [f"acct-{i}" for i in range(12)]


def marks(text: str, channels: tuple[str, ...] = CHANNELS) -> set[str]:
    """Every output the marker gives ``text`` over several secrets and accounts."""
    return {Marker(k, k.code(a), channels=channels).mark(text)
            for k, a in itertools.product(KEYS, ACCOUNTS)}


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


# -- streaming ---------------------------------------------------------------------------

def test_a_double_space_split_between_deltas_marks_as_the_whole_text() -> None:
    text = "It works.  It does not fail, and everyone can't see why.\n"
    cut = text.index("  ") + 1
    for key, account in itertools.product(KEYS, ACCOUNTS):
        whole = Marker(key, key.code(account)).mark(text)
        marker = Marker(key, key.code(account))
        streamed = marker.feed(text[:cut]) + marker.feed(text[cut:]) + marker.flush()
        assert streamed == whole


# -- headings, block quotes, code, HTML are never changed ------------------------------

@pytest.mark.parametrize("underline", ["=====================", "---"])
@xfail("a setext heading's text is released before its underline is read")
def test_a_setext_heading_is_never_changed(underline: str) -> None:
    text = f"Why it does not work\n{underline}\n\nSee above.\n"
    for out in marks(text):
        assert out.startswith("Why it does not work\n"), out


@pytest.mark.parametrize("text", [
    pytest.param(">It does not work, and we cannot fix it.\n"),
    pytest.param("> The error says it cannot connect\nbecause everyone does not have access.\n"),
])
def test_block_quotes_are_never_changed(text: str) -> None:
    assert marks(text) == {text}


def test_a_fence_is_closed_only_by_one_at_least_as_long() -> None:
    text = ("````markdown\n# Title\n```python\nx = 1\n```\n"
            "It does not work, everyone knows.\n````\n\nDone.\n")
    assert marks(text) == {text}


@pytest.mark.parametrize("text", [
    "<pre>\nIt does not work for everyone.\n\n- item one here\n- item two here\n"
    "**bold** text\n</pre>\n",
    "<div>\n- one thing here\n- two things here\n</div>\n",
])
def test_html_blocks_are_never_changed(text: str) -> None:
    assert marks(text) == {text}


# -- markdown renders the same -----------------------------------------------------------

_INDENT = "lists are keyed by exact indent: CommonMark puts these items in one list"
_ENDED = "a heading, fence or quote ends no list: the indented code reads as a list"
_SPACE = "Python whitespace that CommonMark does not count (NBSP, U+3000, U+2028) " \
    "makes a list marker or flanks emphasis"


@pytest.mark.parametrize("text", [
    pytest.param("Steps:\n\n- first item here\n - second item here\n"),
    pytest.param("Steps:\n\n1. first item here\n  2. second item here\n"),
    pytest.param("- top item here\n   - nested one here\n  - nested two here\n"),
    pytest.param("- a thing\n- b thing\n\n# Heading\n\n    - code line here\n"
                 "    - another code line\n"),
    pytest.param("- a thing\n- b thing\n\n```\ncode\n```\n\n    - code line here\n"
                 "    - another one\n"),
    pytest.param("Intro text.\n\n-\u00a0first item here\n-\u00a0second item here\n"),
    pytest.param("Intro text.\n\n1.\u3000first item here\n2.\u3000second item here\n"),
    pytest.param("a\u2028**word** b\n"),
])
def test_markdown_marks_render_identically(text: str) -> None:
    for out in marks(text, (MARKDOWN,)):
        assert COMMONMARK.render(out) == COMMONMARK.render(text), out


# -- quotations, names, titles -----------------------------------------------------------

_OPENS = "a quote opens only at a chunk's first character (after '(' or a b/f/r/u prefix)"


@pytest.mark.parametrize(("text", "quoted"), [
    pytest.param('*"I do not know,"* she said.\n', '"I do not know,"'),
    pytest.param("He paused\u2014\u201cI do not know, I cannot say.\u201d\n",
                 "I do not know, I cannot say."),
    pytest.param('He said:"I do not know."\n', "I do not know."),
    pytest.param('"I will not go. I cannot\ndo it. I do not want to," she said.\n',
                 "I cannot\ndo it. I do not want to,"),
])
def test_quoted_words_are_never_changed(text: str, quoted: str) -> None:
    for out in marks(text):
        assert quoted in out, out


@pytest.mark.parametrize("text", [
    "Everybody Loves Raymond ran for nine seasons.\n",
    pytest.param("Favourites:\n\n- Somebody to Love by Queen\n- Everybody Hurts by R.E.M.\n",
                 marks=xfail("a title whose second word is lower-case reads as a sentence")),
    "Favourites:\n\n- Don't Stop Me Now by Queen\n- Someone Like You by Adele\n",
])
def test_titles_at_a_sentence_start_are_names(text: str) -> None:
    assert marks(text, (LEXICAL, CONTRACTION)) == {text}


@pytest.mark.parametrize("text", ["We met Ms. O'Brien yesterday.\n",
                                  "We use Let's Encrypt for certificates.\n"])
def test_capitalised_words_inside_a_sentence_are_never_changed(text: str) -> None:
    assert marks(text, (TYPOGRAPHY,)) == {text}


# -- contractions and words that would read differently ---------------------------------

@pytest.mark.parametrize("text", [
    "So why doesn't the cache expire?\n",        # -> "why does not the cache expire?"
    "Why won't the server start after a reboot?\n",
    "But why isn't everyone invited?\n",
    "Don't most browsers support it?\n",
])
def test_a_negative_question_with_a_noun_subject_is_left_alone(text: str) -> None:
    assert marks(text, (CONTRACTION,)) == {text}


_NOUN = "an auxiliary after a determiner is a noun ('the will', 'a do not … order')"


@pytest.mark.parametrize("text", [
    pytest.param("She has the will not to quit.\n"),  # "the won't to"
    pytest.param("She signed a do not resuscitate order.\n"),
    pytest.param("He wants to be a somebody.\n"),                      # "a someone"
])
def test_nouns_after_a_determiner_are_left_alone(text: str) -> None:
    assert marks(text, (CONTRACTION, LEXICAL)) == {text}


@pytest.mark.parametrize(("text", "stop"), [
    ("We can't go.\n", "cannot"), ("It isn't.\n", "not"), ("It is not here.\n", "isn"),
])
def test_no_mark_completes_a_stop_sequence(text: str, stop: str) -> None:
    for key, account in itertools.product(KEYS, ACCOUNTS):
        out = Marker(key, key.code(account), stops=[stop]).mark(text)
        assert stop not in out, out


# -- data and code shown without a fence --------------------------------------------------

PRE, POST = "Here is the data you asked for:\n\n", "\n\nThat is all.\n"


@pytest.mark.parametrize("data", [
    pytest.param('name,role,notes\nBob,user,"can\'t log in, does not reset"'),
    pytest.param("description: |\n  This does not work for everyone.\n\n  We cannot fix it.\n"
                 "name: x"),
    pytest.param('bio = """\nShe does not like it.\nEveryone can\'t agree.\n"""'),
    pytest.param('{"regex": "[^}]+", "message": "\\"Hi\\", it does not work for everyone"}'),
    pytest.param("Name | Status\n--- | ---\ncache does not expire | ok",
                 marks=xfail("a table row without a leading pipe is protected only from "
                             "its first '|' on")),
    pytest.param("if node is not parent:\n    return None"),
])
def test_data_and_code_without_a_fence_come_out_byte_identical(data: str) -> None:
    for out in marks(PRE + data + POST):
        assert out == PRE + data + POST, out


# -- detection reads what the marker wrote ------------------------------------------------

def test_emphasis_on_a_lexicon_word_never_moves_another_slot() -> None:
    text = "Ask **everyone** and it's fine.\n"

    def contexts(t: str) -> set[bytes]:
        return {s.context for u in Scanner().feed(t, final=True) for s in u.slots or ()
                if s.context}
    original = contexts(text)
    for out in marks(text):
        assert contexts(out) <= original, out
