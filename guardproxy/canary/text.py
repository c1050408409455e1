"""Cutting text into units and slots, identically for a stream and for a whole text.

The text is read as whitespace runs and chunks (runs of non-whitespace). A chunk is only
final once whitespace follows it, and it is only sent once the next chunk is known (a
word next to code is left alone, a ``-`` is a bullet only if an item follows it), so a
stream holds back at most one word and a partial one: the same text gives the same
slots however it was split.

Nothing is ever a slot in fenced or indented code, inside a backtick run of any length,
in URLs and e-mail addresses, inside quotes, inside ``[...]``/``{...}`` (link text,
JSON), on a markdown table row, on a key-value or assignment line and the YAML block
it opens, on a tab- or column-aligned line, or next to a code-like chunk (see
``shapes``). Capitalised words are slots only where a sentence starts (elsewhere they
may be names), and all-capitals words never are.

A slot's *context* is the two previous chunks in canonical form, where each word of the
lexicon stands for its pair and every channel's variants read alike: choosing any
variant (ours or an attacker's) never changes the context of any other slot.
"""

from __future__ import annotations

import re

from guardproxy.canary import contractions
from guardproxy.canary.channels import Channels
from guardproxy.canary.shapes import (
    BULLETS,
    CAMEL,
    KEY,
    ORDERED,
    PROSE,
    QUOTES,
    SENTENCE_END,
    canonical,
    code_like,
)
from guardproxy.canary.slots import CONTRACTION, LEXICAL, MARKDOWN, TYPOGRAPHY, Slot, Unit

# CommonMark's whitespace, not Python's: "-\u00a0item" is no list item there
_PIECES = re.compile(r"[ \t\n\r\f\v]+|[^ \t\n\r\f\v]+")
_SPACE = re.compile(r"[ \t\n\r\f\v]")
_POSSESSIVE = re.compile("['\u2019]s[^A-Za-z]*$")
_WHITESPACE = frozenset(" \t\n\r\f\v")
_NOT_SPACE = re.compile(r"[^ \t\n\r\f\v]")
_FORMAT = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TICKS = re.compile(r"`+")
_PROMPTS = frozenset({">>>", "...", "$", "%", "PS>", "C:\\>"})
_COLUMN_GAP = re.compile(r"\t| {2,}")
PROSE_CHANNELS = (LEXICAL, TYPOGRAPHY, CONTRACTION)


class Scanner:
    """Turns text into units, fed in any pieces; ``flush`` ends the text."""

    def __init__(self) -> None:
        self.channels = Channels()
        self.parts: list[str] = []          # the last piece read, which may go on
        self.parts_space = False
        self.held: Unit | None = None       # the last complete chunk, until the next
        self.held_bullet = False
        self._bullet_pending = False
        self.chunk_code = False             # the last chunk read is code-like
        self.held_first = False
        self.held_data = False
        self.first_item: list[Unit] = []    # a list's first bullet, until its item is read
        self.waiting: list[Unit] = []       # "does" and a space, until "not" is read
        self.held_ws: list[Unit] = []
        self.gap = ""                       # whitespace between held and next chunk
        self.history = ("^", "^")
        # line state
        self.line_start = True
        self.content_start = True           # next chunk is the first after any marker
        self.blank = True                   # the previous line was blank
        self.line_chunks = 0
        self.indent = 0
        self.code_line = False
        self.line_protected = False
        self.sentence_start = True
        self.prev_code = False
        # block state
        self.fence = ""
        self.ticks = 0                      # length of the open code span's run
        self.quote = ""                     # the closing quote awaited
        self.depth = 0                      # open [ and {
        self.yaml = False
        self.yaml_after = False             # a YAML block before a blank line
        self.quote_block = False            # in a block quote (lazy lines included)
        self.html = ""                      # in an HTML block: what ends it
        self.triple = False                 # in a triple-quoted string

    # -- feeding -------------------------------------------------------------------------
    def feed(self, text: str, final: bool = False) -> list[Unit]:
        if not final and self.parts and not (
                _NOT_SPACE if self.parts_space else _SPACE).search(text):
            self.parts.append(text)  # the last piece goes on: nothing to read yet
            return []
        buf = "".join(self.parts) + text if self.parts else text
        self.parts = []
        out: list[Unit] = []
        pieces = _PIECES.findall(buf)   # they cover buf: the last one ends it
        if pieces and not final:
            # the last piece, a word or a whitespace run, may continue in the next delta
            last = pieces.pop()
            self.parts, self.parts_space = [last], last[0] in _WHITESPACE  # a run: one kind
        for piece in pieces:
            if piece[0] in _WHITESPACE:
                self._whitespace(piece)
                if self.held is None:
                    out.append(Unit(piece))
                else:
                    self.gap += piece
                    self.held_ws.append(Unit(piece))
            else:
                first = self.content_start
                unit = self._chunk(piece)
                data_line = self.line_protected or self.yaml or self.depth > 0
                self._release(out, piece, unit)
                self.held, self.held_bullet = unit, self._bullet_pending
                self.held_first = first and not self._bullet_pending
                self.held_data = data_line
        if final:
            self._release(out, None, None)
        return out

    def flush(self) -> list[Unit]:
        return self.feed("", final=True)

    def _release(self, out: list[Unit], following: str | None, nxt: Unit | None) -> None:
        """Send the held chunk, now that what follows it (``following``, read as
        ``nxt``) is known."""
        held = self.held
        if held is None:
            return
        line_ends = following is None or "\n" in self.gap
        if (following is not None and self.chunk_code) \
                or (self.gap != " " and _COLUMN_GAP.search(self.gap)) \
                or (self.held_first and line_ends):
            # next to code, in a column, or alone on its line (a YAML "- value", a
            # name): not prose
            held.prose = False
            held.pending = None
            if held.slots:
                held.drop(*PROSE_CHANNELS)
        if held.slots:
            rule = following in BULLETS or following == "+"
            if self.held_bullet and ((rule and not line_ends) or (line_ends and _leads(held))):
                # "- - -" is a rule; a "-" alone that no list expects may underline a
                # heading (an empty item of a list follows the list)
                held.drop(MARKDOWN)
            contractions.before_subject(held, following)
            if following is not None and held.text[:1].isupper() \
                    and following.lstrip("\"'(*\u201c\u2018")[:1].isupper():
                # "Everybody Loves Raymond", "Let's Encrypt": a name, left as it is,
                # but for a possessive's apostrophe ("Philosopher's Path")
                if _POSSESSIVE.search(held.text):
                    held.drop(LEXICAL, CONTRACTION)
                else:
                    held.drop(*PROSE_CHANNELS)
                held.pending = None
        if self.waiting:  # "does" + " " wait for this "not"
            contractions.complete(self.waiting[0], self.waiting[1:], held, following,
                                  self.channels.ident())
            out.extend(self.waiting)
            self.waiting = []
        if self.held_bullet and _leads(held) and not line_ends:
            # a list's first bullet waits for its item: "- value" alone on its line or
            # "- key: value" is YAML, where "*" would change the data
            self.first_item = [held, *self.held_ws]
        else:
            if self.first_item:
                if self.held_first and (line_ends or self.held_data):
                    self.first_item[0].drop(MARKDOWN)
                out.extend(self.first_item)
                self.first_item = []
            if held.pending is not None and nxt is not None \
                    and contractions.follows(nxt, self.gap):
                self.waiting = [held, *self.held_ws]
            else:
                held.pending = None
                out.append(held)
                out.extend(self.held_ws)
        self.held, self.held_ws, self.gap = None, [], ""

    # -- line and block state ------------------------------------------------------------
    def _whitespace(self, run: str) -> None:
        if run == " ":   # the common run: what the general case below does with it
            if self.line_start:
                self.indent += 1
            return
        newlines = run.count("\n") + run.count("\r") - run.count("\r\n")
        if newlines:
            blank = newlines > 1 or self.line_chunks == 0
            self.line_start = self.content_start = self.sentence_start = True
            self.code_line = self.line_protected = self.prev_code = False
            self.line_chunks = 0
            self.indent = 0
            if blank:
                self.channels.new_paragraph()
                self.blank = True
                self.depth = 0
                self.ticks = 0
                self.quote = ""
                self.yaml_after = self.yaml   # a YAML block goes on if still indented
                self.yaml = self.quote_block = False
                if self.html == "\n":
                    self.html = ""            # an HTML block of kind 6/7 ends here
            run = run[max(run.rfind("\n"), run.rfind("\r")) + 1:]
        elif run != " " and _COLUMN_GAP.search(run) and not self.line_start:
            self.line_protected = True  # a column-aligned or tab-separated row
        if self.line_start:
            self.indent += run.count(" ") + 4 * run.count("\t")

    def _chunk(self, chunk: str) -> Unit:
        prose = PROSE.fullmatch(chunk)
        # read again when the held one is released (code_like, its prose case inlined:
        # no camel case without a capital)
        self.chunk_code = False if prose and (chunk.islower() or not CAMEL.search(chunk)) \
            else code_like(chunk, prose)
        self._bullet_pending = False
        first, self.line_start = self.line_start, False
        content_first, self.content_start = self.content_start, False
        after_blank, self.blank = self.blank and first, False
        self.line_chunks += 1
        if first:
            if self.yaml_after:
                self.yaml, self.yaml_after = self.indent > 0, False
            if self.indent < 4 and chunk.startswith(("```", "~~~")):
                run = len(chunk) - len(chunk.lstrip(chunk[0]))
                if not self.fence:
                    self.fence = chunk[:run]
                    self.channels.end_lists()
                elif chunk[0] == self.fence[0] and run >= len(self.fence) \
                        and chunk.strip(chunk[0]) == "":
                    self.fence = ""   # closed only by a run of its kind at least as long
                return Unit(chunk)
            if not self.fence and not self.html and self.indent < 4 \
                    and _HTML_START.match(chunk):
                opener = _HTML_START.match(chunk)
                assert opener is not None
                self.html = _HTML_CLOSERS.get(opener.group(1).lower(), "\n")
                self.channels.end_lists()
        if self.fence:
            return Unit(chunk)
        if self.html:
            if self.html in _HTML_CLOSERS.values() and self.html in chunk.lower():
                self.html = ""
            self.prev_code = True
            return Unit(chunk)
        if self.triple or '"""' in chunk or "\'\'\'" in chunk:
            if (chunk.count('"""') + chunk.count("\'\'\'")) % 2:
                self.triple = not self.triple   # a multi-line string (TOML, Python)
            self.prev_code = True
            return Unit(chunk)
        if first and self.indent >= 4 and not (self.channels.lists and _list_marker(chunk)):
            self.code_line = True  # indented code, or a continuation: left alone either way
        if self.code_line:
            return Unit(chunk)
        if self.ticks or "`" in chunk:
            for run in _TICKS.findall(chunk):
                if not self.ticks:
                    self.ticks = len(run)
                elif len(run) == self.ticks:
                    self.ticks = 0
            self.prev_code = True
            return Unit(chunk)
        if "://" in chunk or chunk.startswith("www.") or "@" in chunk:
            self.prev_code = True
            return Unit(chunk)
        zw = ""
        if not chunk.isascii() and _FORMAT.search(chunk):   # (format characters are not ASCII)
            # invisible format characters (the tripwire's, or an attacker's U+2060 after
            # every word) are read through; a chunk holding them is never rewritten
            zw = "".join(_FORMAT.findall(chunk))
            clean = _FORMAT.sub("", chunk)
            if not clean or content_first:   # nothing visible; or a marker's place
                self.prev_code = self.chunk_code
                return Unit(chunk, zw=zw)
        else:
            clean = chunk
        match = prose if clean is chunk else PROSE.fullmatch(clean)
        if first and self.quote_block:
            self.line_protected = True   # a lazy continuation line of a block quote
        if content_first:
            marker = self._line_marker(clean, after_blank, first)
            if marker is not None:
                return marker
            if clean.startswith("|") or clean in _CODE_WORDS:
                self.line_protected = True
            elif KEY.fullmatch(clean):
                self.line_protected = self.yaml = True
        quoted = self.quote
        if quoted or self.line_protected or self.yaml or self.depth > 0 \
                or (not clean.isalpha() and (_SPECIAL.search(clean) or clean == "->")):
            protected = self._protected(clean)
        else:
            protected = False   # the common word: what _protected says of it
        speech = (quoted in ('"', "\u201d") or self.quote in ('"', "\u201d")) \
            and not (self.line_protected or self.yaml or self.depth)
        h0, h1 = self.history
        was_code, self.prev_code = self.prev_code, self.chunk_code
        sentence, self.sentence_start = \
            self.sentence_start, clean.rstrip(_CLOSERS)[-1:] in SENTENCE_END  # _ends_sentence
        if match is None:
            # "__word__" reads as "**word**" would: a mark's underscores move no context
            starred = PROSE.fullmatch(clean.replace("_", "*")) if "_" in clean else None
            if starred is None:
                self.history = (h1, canonical(clean))
                return Unit(chunk, zw=zw)
            tokens, unit = self.channels.word(chunk, clean, starred, h0, h1, zw,
                                              sentence=sentence, prose=False)
            for token in tokens:
                self.history = (self.history[1], token)
            return Unit(chunk, zw=zw)
        tokens, unit = self.channels.word(chunk, clean, match, h0, h1, zw,
                                          sentence=sentence,
                                          prose=not (protected or was_code or self.prev_code),
                                          speech=speech)
        for token in tokens:
            self.history = (self.history[1], token)
        return unit

    def _line_marker(self, chunk: str, after_blank: bool, first: bool) -> Unit | None:
        """A list bullet, a list number, a heading or quote marker at the line start."""
        if _list_marker(chunk):
            self.content_start = self.sentence_start = True
            h0, h1 = self.history
            self.history = (h1, "_")
            if not first:  # "- - -" or "- * item": a rule or a rarity, left alone
                return Unit(chunk)
            self._bullet_pending = True
            return self.channels.list_marker(chunk, self.indent, h0, h1)
        if chunk.strip("#") == "" or chunk.startswith(">") or chunk in _PROMPTS:
            # a heading (links point at its words), a quotation (a mark would misquote;
            # its lazy continuation lines too), a doctest or shell prompt: the whole line
            # is left alone, and a list before it has ended
            self.line_protected = True
            self.quote_block = self.quote_block or (chunk.startswith(">")
                                                    and chunk not in _PROMPTS)
            self.channels.end_lists()
            self.history = (self.history[1], "_")
            return Unit(chunk)
        if after_blank and self.indent == 0:
            self.channels.end_lists()  # a paragraph after a blank line ends every list
        return None

    def _protected(self, chunk: str) -> bool:
        """Quoted, bracketed, on a protected line, or in a YAML block."""
        inside = self.line_protected or self.yaml or self.depth > 0 or bool(self.quote)
        if not self.quote and not _SPECIAL.search(chunk):
            if chunk == "->":
                self.line_protected = inside = True
            return inside   # the common word: no bracket, operator or quote
        if _DATA.search(chunk):
            bare = _STRING.sub("", chunk)   # brackets inside "…" strings do not count
            opens = bare.count("{") + bare.count("[")
            closes = bare.count("}") + bare.count("]")
            self.depth = max(0, self.depth + opens - closes)
            inside = True
            if "=" in chunk or "|" in chunk:
                self.line_protected = True
        elif chunk == "->":
            self.line_protected = inside = True
        if not self.quote and not _QUOTE_CHAR.search(chunk):
            return inside
        # quotes open after a non-letter ('*"I', '—“I', 'said:"I', ',"can') and close
        # before one; an apostrophe between letters is neither
        for m in _QUOTE_CHAR.finditer(chunk):
            c, at = m.group(), m.start()
            before = chunk[at - 1] if at else " "
            after = chunk[at + 1] if at + 1 < len(chunk) else " "
            if self.quote and c == self.quote and not after.isalnum():
                self.quote = ""
                inside = True
            elif not self.quote and c in QUOTES and not before.isalnum() \
                    and not (c in "'\u2019" and before.isalnum()):
                self.quote = QUOTES[c]
                inside = True
            elif not self.quote and c in QUOTES and before in "bfruBFRU" and (
                    at < 2 or not chunk[at - 2].isalnum()):
                self.quote = QUOTES[c]     # b"…", f'…': a string literal
                inside = True
        return inside


_CLOSERS = ")\"'\u201d\u2019*_"
_DATA = re.compile(r"[\[\]{}=|]")
_SPECIAL = re.compile("[\\[\\]{}=|\"'\u201c\u201d\u2018\u2019\u00ab\u00bb]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_QUOTE_CHAR = re.compile("[\"'\u201c\u201d\u2018\u2019\u00ab\u00bb]")
_HTML_START = re.compile(r"</?([A-Za-z][A-Za-z0-9-]*|!--)")
_HTML_CLOSERS = {"pre": "</pre>", "script": "</script>", "style": "</style>",
                 "textarea": "</textarea>", "!--": "-->"}
# a line that starts like code, lower-case as prose never would: "if node is not x:"
_CODE_WORDS = frozenset({"if", "elif", "else:", "while", "for", "return", "assert", "def",
                         "class", "import", "from", "except", "with", "lambda", "yield",
                         "raise", "const", "let", "var", "function", "fn", "select",
                         "sudo", "git", "pip", "npm", "curl", "cd", "echo", "export"})


def _ends_sentence(chunk: str) -> bool:
    return chunk.rstrip(_CLOSERS)[-1:] in SENTENCE_END


def _leads(unit: Unit) -> bool:
    """A unit whose first slot makes a choice of its own (a list's first bullet; one
    bound to differ from the list before it must not be dropped, nor wait)."""
    return bool(unit.slots) and bool(unit.slots[0].context)  # type: ignore[index]


def _list_marker(chunk: str) -> bool:
    return chunk in BULLETS or chunk == "+" or ORDERED.fullmatch(chunk) is not None


def read_slots(text: str) -> list[Slot]:
    """Every slot of a whole text that makes a choice of its own (detection's sites),
    in order: ``Slot.context`` and ``Slot.member`` are what a site's keyed choice is
    compared with, ``Slot.channel`` names the channel."""
    return [slot for unit in Scanner().feed(text, final=True) for slot in unit.slots or ()
            if slot.context]
