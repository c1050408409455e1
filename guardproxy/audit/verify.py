"""Checking a chained audit trail (``audit: {chain: true}``) across its rotated files.

    report = verify_chain(rotation_order(["audit.jsonl", "audit.jsonl.2", "audit.jsonl.1"]))
    report.breaks   # [Break("audit.jsonl.1", 17, "…")]: empty when the chain holds

Each line's ``prev`` must be the hash (``line.line_hash``) of the line before it, the
last line of the previous file for a file's first line. The first line's ``prev`` is
taken as given (the anchor): ``line.GENESIS`` when the trail starts there, else the
hash of a line rotated away. A changed line breaks the chain at the line after it, a
removed or inserted line (or file) where it was; after a break, checking resumes from
the line that broke it, so each break is reported once. Lines cut from the end leave
no trace in the chain: keep ``last`` (the last line's hash) somewhere else to tell.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from guardproxy.audit.line import GENESIS, line_hash

_ROTATED = re.compile(r"(.*)\.([0-9]{1,9})")


def rotation_order(paths: Sequence[str]) -> list[str]:
    """``paths`` with the rotations of one trail oldest first (``X.3``, ``X.2``, ``X.1``,
    ``X``); different trails keep the order in which they were first named; a path
    named twice counts once."""
    return [p for trail in trails(paths) for p in trail]


def trails(paths: Sequence[str]) -> list[list[str]]:
    """``paths`` grouped by trail (a file and its ``.N`` rotations: one chain each, as
    per-worker ``audit-{pid}.jsonl`` trails are), each oldest first."""
    groups: dict[str, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    for path in paths:
        norm = os.path.normpath(path)
        if norm in seen:
            continue
        seen.add(norm)
        m = _ROTATED.fullmatch(norm)
        base, n = (m.group(1), int(m.group(2))) if m else (norm, 0)
        groups.setdefault(base, []).append((n, path))
    return [[p for _, p in sorted(items, key=lambda t: -t[0])] for items in groups.values()]


@dataclass(frozen=True, slots=True)
class Break:
    file: str
    line: int          # 1-based, in ``file``
    reason: str

    def text(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Report:
    files: int = 0
    lines: int = 0
    breaks: list[Break] = field(default_factory=list)
    anchor: str | None = None       # the first line's ``prev``
    last: str | None = None         # the hash of the last complete line
    incomplete: str | None = None   # "FILE:LINE" of an unterminated last line (skipped)

    def text(self) -> str:
        """The summary line printed when there is no break."""
        files = f"{self.files} file{'' if self.files == 1 else 's'}"
        out = f"OK: {self.lines:,} line{'' if self.lines == 1 else 's'} in {files}"
        if self.anchor == GENESIS:
            out += "; the chain starts at the trail's first line"
        elif self.anchor is not None:
            out += (f"; the chain starts after a line not given (prev {self.anchor[:16]}…: "
                    "older files rotated away or not named)")
        if self.last is not None:
            out += f"; last line's hash {self.last}"
        if self.incomplete:
            out += f"; {self.incomplete} is not yet a whole line (being written?): skipped"
        return out


def verify_chain(paths: Iterable[str]) -> Report:
    """Check the chain through ``paths`` in the order given (see the module doc).
    Raises ``OSError`` when a file cannot be read."""
    report = Report()
    paths = list(paths)
    expected: str | None = None     # the hash of the line before
    before = ""                     # where that line is, "FILE:LINE"
    for index, path in enumerate(paths):
        report.files += 1
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                terminated = raw.endswith(b"\n")
                line = raw[:-1] if terminated else raw
                if not terminated:   # the end of this file
                    if index == len(paths) - 1:
                        report.incomplete = f"{path}:{number}"
                        break
                    report.breaks.append(Break(path, number, "the file ends inside this "
                                               "line (cut short?)"))
                report.lines += 1
                prev, problem = _prev_of(line)
                if problem:
                    report.breaks.append(Break(path, number, problem))
                elif expected is None:
                    report.anchor = prev
                elif prev != expected:
                    report.breaks.append(Break(
                        path, number, f"'prev' is not the hash of the line before ({before}): "
                        "that line was changed, or lines were removed or inserted here"))
                expected = report.last = line_hash(line)
                before = f"{path}:{number}"
    return report


def _prev_of(line: bytes) -> tuple[str | None, str]:
    """(the line's ``prev``, "") or (None, what is wrong with the line)."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not a JSON line (a torn write, or edited)"
    prev = doc.get("prev") if isinstance(doc, dict) else None
    if not isinstance(prev, str) or not re.fullmatch(r"[0-9a-f]{64}", prev):
        return None, "no 'prev' hash: not a line of a chained trail"
    return prev, ""
