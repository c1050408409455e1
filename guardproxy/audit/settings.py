"""The policy's ``audit:`` section and the per-rule ``audit: {include: […]}``.

    audit:
      path: /var/log/guardproxy/audit.jsonl   # or "-" for stdout; {pid}: the process id
      max_bytes: 100MB                        # rotate past this size (0: never)
      backups: 10                             # rotated files kept (audit.jsonl.1 … .10;
                                              #   0: a full file is discarded)
      chain: false                            # each line carries the previous line's hash
      include: []                             # text every line carries: prompt, response
      queue: 10000                            # lines waiting for the writer thread

Raw API keys, admin tokens, linkage raw values and prompt or response text never
appear in a line, unless ``include`` (here: for every request; on a rule: for the
requests that rule decided, e.g. accounts under investigation) names ``prompt`` or
``response``.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardproxy.policy.reader import Reader
from guardproxy.policy.values import parse_size

TEXT_FIELDS = ("prompt",)   # the response text is not kept by any stage yet
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 10
DEFAULT_QUEUE = 10_000


@dataclass(frozen=True)
class AuditSettings:
    path: str                       # a file, or "-" for stdout
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    chain: bool = False
    include: tuple[str, ...] = ()
    queue: int = DEFAULT_QUEUE


def parse_audit(top: Reader) -> AuditSettings | None:
    """The top-level ``audit:`` section, or None when absent (no audit trail)."""
    r = top.child("audit")
    if r is None:
        return None
    r.allow(("path", "max_bytes", "backups", "chain", "include", "queue"), required=("path",))
    path = (r.string("path") or "").strip()
    if r.has("path") and not path:
        r.problem("must name a file, or '-' for stdout", "path")
    max_bytes = r.parsed("max_bytes", _size, DEFAULT_MAX_BYTES)
    backups = r.typed("backups", int, DEFAULT_BACKUPS)
    if backups is None or backups < 0:
        r.problem("must be a whole number, 0 or more", "backups")
        backups = DEFAULT_BACKUPS
    return AuditSettings(path=path or "-", max_bytes=max_bytes, backups=backups,
                         chain=bool(r.typed("chain", bool, False)),
                         include=parse_include(r),
                         queue=r.positive_int("queue", DEFAULT_QUEUE, maximum=10_000_000))


def parse_include(r: Reader) -> tuple[str, ...]:
    """``include: [prompt]`` of ``r``: the text fields named (validated)."""
    if not r.has("include"):
        return ()
    names = r.string_list("include") or ()
    for name in names:
        if name not in TEXT_FIELDS:
            r.problem(f"unknown field {name!r} (expected {', '.join(TEXT_FIELDS)})", "include")
    return tuple(n for n in names if n in TEXT_FIELDS)


def parse_rule_audit(rule: Reader) -> tuple[str, ...]:
    """A rule's ``audit: {include: [prompt]}``: the text its decided requests carry."""
    r = rule.child("audit")
    if r is None:
        return ()
    r.allow(("include",), required=("include",))
    return parse_include(r)


def _size(value: object) -> int:
    if value == 0 or value == "0":
        return 0
    return parse_size(value)
