"""Read YAML into plain Python values that remember their line numbers.

Every mapping becomes a ``LocDict`` and every sequence a ``LocList`` so that a
problem found later, while typing the values, can still name ``file:line``.
``${VAR}`` and ``${VAR:-default}`` in string scalars and keys are expanded from the
environment here, where the line is known; an expanded value is never expanded again.

Whatever the file holds, ``read_yaml`` returns values or records problems: it never
raises. What it accepts of YAML: the plain types (strings, integers and floats of a
sane size, booleans, null; dates are kept as their text), string keys, anchors and
aliases (not recursive ones, and not expanding past ``MAX_VALUES`` values) and merge
keys (``<<: *base``). Any other tag (``!!python/...``, ``!!binary``, ``!custom``) is a
problem, as is a second document.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from guardproxy.errors import Problem

MAX_FILE_BYTES = 4 << 20   # a policy or accounts file larger than this is refused
MAX_DEPTH = 64             # nesting of mappings and lists
MAX_VALUES = 200_000       # values after expanding aliases (a "billion laughs" guard)
MAX_INT = 2**63 - 1        # integers beyond int64 are refused rather than half-supported

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^{}]*?))?\}")
_TAG = "tag:yaml.org,2002:"
_AS_TEXT = {_TAG + "str", _TAG + "timestamp", _TAG + "value"}   # kept as the text written
_CONSTRUCTED = {_TAG + "int", _TAG + "float", _TAG + "bool", _TAG + "null"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # all that splitlines() splits on


class LocDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class LocList(list[Any]):
    line: int = 0
    item_lines: list[int]


class _TooLarge(Exception):
    """Raised out of the conversion: the document expands past ``MAX_VALUES``."""


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


class _Converter:
    def __init__(self, file: str, env: Mapping[str, str], problems: list[Problem]) -> None:
        self.file = file
        self.env = env
        self.problems = problems
        self.constructor = yaml.SafeLoader("")
        self.values = 0
        self.open: set[int] = set()   # ids of the collection nodes being converted

    def problem(self, line: int, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, line, path, message))

    def convert(self, node: yaml.Node, path: str, depth: int = 0) -> Any:
        line = node.start_mark.line + 1
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path, line)
        if id(node) in self.open:
            self.problem(line, path, "recursive alias: an anchor used inside itself")
            return None
        if depth >= MAX_DEPTH:
            self.problem(line, path, f"nested more than {MAX_DEPTH} levels deep")
            return None
        expected = _TAG + ("map" if isinstance(node, yaml.MappingNode) else "seq")
        if node.tag != expected:
            self.problem(line, path, f"unsupported YAML tag {_tag_name(node.tag)}")
            return None
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, depth, line)
            seq = LocList()
            seq.line, seq.item_lines = line, []
            for i, item in enumerate(node.value):
                seq.append(self.convert(item, f"{path}[{i}]", depth + 1))
                seq.item_lines.append(item.start_mark.line + 1)
            return seq
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int, line: int) -> LocDict:
        out = LocDict()
        out.line, out.key_lines = line, {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                merges.append(value_node)
                continue
            key = self._key(key_node, path, key_line)
            if key is None:
                continue
            sub = f"{path}.{key}" if path else key
            if key in out:
                self.problem(key_line, sub, "duplicate key")
                continue
            out[key] = self.convert(value_node, sub, depth + 1)
            out.key_lines[key] = key_line
        for merge in merges:  # keys written here win over merged ones; earlier merges win
            for source in self._merge_sources(merge, path, depth):
                for key, value in source.items():
                    if key not in out:
                        out[key] = value
                        out.key_lines[key] = source.key_lines.get(key, source.line)
        return out

    def _merge_sources(self, node: yaml.Node, path: str, depth: int) -> list[LocDict]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        sources = []
        for item in items:
            value = (self.convert(item, path, depth + 1)
                     if isinstance(item, yaml.MappingNode) else None)
            if isinstance(value, LocDict):
                sources.append(value)
            elif not isinstance(item, yaml.MappingNode):
                self.problem(item.start_mark.line + 1, path,
                             "a merge key (<<) takes a mapping or a list of mappings")
        return sources

    def _key(self, node: yaml.Node, path: str, line: int) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(line, path, "a key must be a plain string, not a list or mapping")
            return None
        if node.tag not in _AS_TEXT:
            self.problem(line, path, f"key {one_line(node.value)!r} is read as "
                         f"{_tag_name(node.tag)} by YAML: write it in quotes")
            return None
        key: str = node.value
        if "${" in key:
            key = self._expand(key, line, path)
        if _CONTROL.search(key):
            self.problem(line, path, f"key {one_line(key)!r} contains control characters")
            return None
        return key

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        if node.tag in _AS_TEXT:
            value: Any = node.value
        elif node.tag not in _CONSTRUCTED:
            self.problem(line, path, f"unsupported YAML tag {_tag_name(node.tag)}")
            return None
        elif node.tag == _TAG + "int" and len(node.value) > 70:  # int() of 5000 digits fails
            self.problem(line, path, "number out of range")
            return None
        else:
            try:
                value = self.constructor.construct_object(node)
            except (ValueError, LookupError, TypeError, AttributeError, yaml.YAMLError):
                self.problem(line, path, f"not a valid {_tag_name(node.tag)}: "
                             f"{one_line(node.value)[:60]!r}")
                return None
        if isinstance(value, str) and "${" in value:
            return self._expand(value, line, path)
        if (isinstance(value, int) and abs(value) > MAX_INT) or (
                isinstance(value, float) and not math.isfinite(value)):
            self.problem(line, path, "number out of range" if not isinstance(value, float)
                         or not math.isnan(value) else "not a number (.nan)")
            return None
        return value

    def _expand(self, text: str, line: int, path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value not in (None, ""):
                return str(value)
            if default is not None:
                return default
            self.problem(line, path, f"environment variable {name} is not set "
                         f"(write ${{{name}:-default}} to give a default)")
            return ""

        if "${" in _ENV_REF.sub("", text):  # e.g. ${A:-${B}} or an unclosed ${A
            self.problem(line, path, "malformed environment reference: write ${NAME} or "
                         "${NAME:-default} (a default cannot hold another ${...})")
            return text
        # one pass over the text as written: a variable's value is never expanded again
        return _ENV_REF.sub(substitute, text)


def _first_line(text: str) -> str:
    return one_line(text.strip().splitlines()[0] if text.strip() else text)


def read_yaml(path: Path, env: Mapping[str, str], problems: list[Problem]) -> Any:
    """Parse one YAML file; every failure becomes a problem, never an exception.

    Returns ``None`` for an empty (or unreadable) file, else a ``LocDict``, ``LocList``
    or scalar; values that were invalid are ``None`` and have a problem each.
    """
    file = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(Problem(file, 0, "", f"cannot read file: {one_line(reason)}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        problems.append(Problem(file, 0, "", f"file larger than {MAX_FILE_BYTES >> 20} MiB"))
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(Problem(file, line, "", f"not UTF-8 text (byte "
                                f"{data[exc.start]:#04x} at offset {exc.start})"))
        return None
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character at once: may raise too
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problems.append(Problem(file, line, "",
                                f"invalid YAML: {_first_line(exc.problem or str(exc))}"))
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problems.append(Problem(file, line, "", f"invalid YAML: {_first_line(str(exc))}"))
        return None
    except RecursionError:
        line = loader.line + 1 if loader else 0
        problems.append(Problem(file, line, "", "invalid YAML: nested too deeply"))
        return None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        # the scanner's own escapes, e.g. "\U7fffffff", fail with a plain ValueError
        line = loader.line + 1 if loader else 0
        problems.append(Problem(file, line, "", f"invalid YAML: {_first_line(str(exc))}"))
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None
    try:
        return _Converter(file, env, problems).convert(node, "")
    except _TooLarge:
        problems.append(Problem(file, node.start_mark.line + 1, "",
                                f"aliases expand to more than {MAX_VALUES} values"))
        return None


def outline(path: Path) -> LocDict | None:
    """The file's top mapping with line numbers and ``${...}`` left as written, or None
    when it cannot be read: for messages about an already loaded policy."""
    doc = read_yaml(path, {}, [])
    return doc if isinstance(doc, LocDict) else None
