"""A large, varied, deterministic text corpus for canary work: ``python -m bench.texts``.

Five kinds of text, each a list of documents (plain ``str``):

- ``technical_docs``: docstrings of the installed Python standard library (modules,
  classes, functions, methods and properties of the modules in :data:`STDLIB`, walked
  with :mod:`inspect`, one document per module) plus the language-reference topics that
  ``pydoc`` shows for ``help("topic")``. Deterministic for a given Python version.
- ``readmes``: the markdown long descriptions (``Description-Content-Type:
  text/markdown``) of the installed distributions, this project's own left out.
  Deterministic for a given set of installed distributions.
- ``assistant``, ``dialogue``: our own text in ``tests/data/corpus/<kind>/*.md``.
- ``prose``: ``tests/data/prose.txt`` and ``tests/data/corpus/prose/*.md``.

:func:`sentences` cuts a document into prose sentences (code blocks, indented code,
table rows and lines that are mostly symbols dropped) for blind samples of marked text.

Run as a script, prints documents, words and the share of words that are lexicon words
per kind (an upper bound on site density: code and identifiers are counted too).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from guardproxy.canary.lexicon import INDEX, PAIRS

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "corpus"
KINDS = ("technical_docs", "readmes", "assistant", "dialogue", "prose")

# Top-level stdlib modules and packages (their public submodules are walked too). Left
# out: modules with side effects on import (antigravity, this, readline, rlcompleter),
# GUI and platform-only ones, deprecated internals and the test suite.
STDLIB = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "bdb", "binascii",
    "bisect", "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "colorsys", "compileall", "concurrent", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm",
    "decimal", "difflib", "dis", "doctest", "email", "enum", "errno", "faulthandler",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "http", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "marshal", "math",
    "mimetypes", "mmap", "modulefinder", "multiprocessing", "netrc", "numbers", "opcode",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats",
    "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize",
    "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata",
    "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "webbrowser", "wsgiref",
    "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


def _modules(name: str) -> Iterator[ModuleType]:
    """The module and its public submodules, depth first, in name order; those that
    cannot be imported here (other platforms, missing C extensions) are skipped."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_") and "test" not in info.name:
            yield from _modules(f"{name}.{info.name}")


def _module_docstrings(module: ModuleType, seen: set[str]) -> list[str]:
    docs: list[str] = []

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:  # inherited and re-exported docstrings once only
            seen.add(doc)
            docs.append(doc)

    add(module)
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        add(value)
        if inspect.isclass(value):
            for attr, member in sorted(vars(value).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(member, classmethod | staticmethod):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    add(member)
    return docs


def technical_docs() -> list[str]:
    """One document per stdlib module (its docstrings joined by blank lines), then one
    per pydoc topic."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules still have docs
        for top in STDLIB:
            for module in _modules(top):
                docs = _module_docstrings(module, seen)
                if docs:
                    out.append("\n\n".join(docs))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return out
    out.extend(topics[key] for key in sorted(topics))
    return out


def readmes() -> list[str]:
    """Markdown long descriptions of installed distributions, by distribution name."""
    by_name: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        name = (meta["Name"] or "").lower()
        kind = (meta["Description-Content-Type"] or "").lower()
        body = meta.get_payload() or meta["Description"] or ""  # type: ignore[attr-defined]
        if name and name != "guardproxy" and "markdown" in kind and body.strip():
            by_name.setdefault(name, str(body))
    return [by_name[name] for name in sorted(by_name)]


def _files(kind: str) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((CORPUS / kind).glob("*.md"))]


def documents(kind: str) -> list[str]:
    """The documents of one kind; ``KeyError`` for an unknown kind."""
    if kind == "technical_docs":
        return technical_docs()
    if kind == "readmes":
        return readmes()
    if kind in ("assistant", "dialogue"):
        return _files(kind)
    if kind == "prose":
        return [(REPO / "tests" / "data" / "prose.txt").read_text(encoding="utf-8"),
                *_files("prose")]
    raise KeyError(kind)


def kinds() -> dict[str, list[str]]:
    """Every kind of text: name -> documents."""
    return {kind: documents(kind) for kind in KINDS}


_FENCE = re.compile(r"^\s*(```|~~~)")
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)]|#+)\s+")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_KEY_VALUE = re.compile(r"^\s*(?:-\s+)?[\"']?[\w.$-]+[\"']?\s*[:=](?:\s|$)")  # YAML, INI, env
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "cf.", "mr.", "mrs.", "ms.",
                            "dr.", "no.", "approx.", "fig.", "st.", "jr.", "sr."})


def _prose_lines(text: str) -> Iterator[str]:
    """Paragraphs and list items as single lines; code, tables, key-value lines and
    symbol-heavy lines (JSON, YAML, shell) left out."""
    fenced = False
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if _FENCE.match(line):
            fenced = not fenced
            continue
        stripped = line.strip()
        letters = sum(c.isalpha() or c.isspace() for c in stripped)
        if fenced or not stripped or line.startswith(("    ", "\t")) or stripped[0] in "|{}[]<>" \
                or letters < 0.75 * len(stripped) or _KEY_VALUE.match(line) or _ITEM.match(line):
            if block:
                yield " ".join(block)
                block = []
            if _ITEM.match(line) and not fenced and letters >= 0.75 * len(stripped):
                block = [_ITEM.sub("", line).strip()]
            continue
        block.append(stripped)


def sentences(text: str) -> list[str]:
    """Prose sentences of a document, in order, whitespace-normalised."""
    out: list[str] = []
    for line in _prose_lines(text):
        start = 0
        for match in _BOUNDARY.finditer(line):
            head = line[start:match.start()].rsplit(None, 1)
            last = head[-1].lower().rstrip("\"'\u201d\u2019)]") if head else ""
            if last in _ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last):
                continue  # "e.g. Python", "J. Smith"
            out.append(line[start:match.end()].strip())
            start = match.end()
        out.append(line[start:].strip())
    # a list item that is only inline code ("`pip install x`") is not a sentence
    return [s for s in out if re.search(r"[A-Za-z]", re.sub(r"`[^`]*`", "", s))]


def site_share(text: str, index: dict[str, tuple[int, int]] = INDEX) -> tuple[int, int]:
    """(words whose lower-cased letters are in ``index``, words): an upper bound on
    marking sites, as code and identifiers are counted too."""
    words = text.split()
    sites = sum(1 for w in words if w.strip("\"'`*_()[]{}<>,.;:!?").lower() in index)
    return sites, len(words)


def pair_counts(corpus: dict[str, list[str]],
                pairs: tuple[tuple[str, str], ...] = PAIRS) -> dict[str, dict[str, int]]:
    """"a/b" -> kind -> occurrences of either word (lower-cased, whole words): whether a
    pair earns its place."""
    wanted = {w for pair in pairs for w in pair}
    counts: dict[str, dict[str, int]] = {f"{a}/{b}": {} for a, b in pairs}
    for kind, docs in corpus.items():
        seen = Counter(w for doc in docs for w in re.findall(r"[a-z]+", doc.lower())
                       if w in wanted)
        for a, b in pairs:
            counts[f"{a}/{b}"][kind] = seen[a] + seen[b]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--pairs", action="store_true",
                        help="also print each pair's occurrences per kind")
    args = parser.parse_args()
    corpus = kinds()
    table: dict[str, dict[str, float]] = {}
    for kind, docs in corpus.items():
        sites = words = 0
        for doc in docs:
            s, w = site_share(doc)
            sites, words = sites + s, words + w
        table[kind] = {"documents": len(docs), "words": words,
                       "lexicon_share": round(sites / max(1, words), 5)}
    counts = pair_counts(corpus) if args.pairs else {}
    if args.json:
        print(json.dumps({"kinds": table, "pairs": counts}, indent=2))
        return
    for kind, row in table.items():
        print(f"{kind:15} {row['documents']:6,.0f} docs {row['words']:9,.0f} words  "
              f"lexicon words {row['lexicon_share']:.3%}")
    for pair, per_kind in counts.items():
        print(f"{pair:28}", "  ".join(f"{k} {n}" for k, n in per_kind.items()))


if __name__ == "__main__":
    main()
