"""``when:`` — which requests a rule applies to.

Each field takes one value or a list; ``model`` and ``path`` accept shell-style
globs (``gpt-4*``, ``/v1/chat/*``). Patterns are compiled once at load time.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

MATCH_FIELDS = ("tier", "org", "account", "model", "path", "method", "header")
_GLOB_FIELDS = {"model", "path"}


@dataclass(frozen=True)
class Pattern:
    exact: frozenset[str]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, values: tuple[str, ...], glob: bool) -> Pattern:
        exact = frozenset(v for v in values if not (glob and any(c in v for c in "*?[")))
        globs = [fnmatch.translate(v) for v in values if v not in exact]
        return cls(exact, re.compile("|".join(globs)) if globs else None)

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if value in self.exact:
            return True
        return self.regex is not None and self.regex.match(value) is not None


@dataclass(frozen=True)
class Match:
    """All given fields must match (AND); values within a field are alternatives (OR)."""

    fields: tuple[tuple[str, Pattern], ...] = ()
    headers: tuple[tuple[str, Pattern], ...] = ()

    @classmethod
    def build(cls, spec: Mapping[str, tuple[str, ...]],
              headers: Mapping[str, tuple[str, ...]]) -> Match:
        fields = tuple(
            (name, Pattern.compile(tuple(v.upper() for v in values) if name == "method"
                                   else values, name in _GLOB_FIELDS))
            for name, values in spec.items()
        )
        hdrs = tuple((name.lower(), Pattern.compile(values, True))
                     for name, values in headers.items())
        return cls(fields, hdrs)

    @property
    def always(self) -> bool:
        return not self.fields and not self.headers

    def could_match(self, attrs: Mapping[str, str | None]) -> bool:
        """Whether some request with these attributes can match: fields absent from
        ``attrs`` (model, path, headers…) are taken as able to match, a ``None`` value
        as unknown (it matches no pattern). For linting: does a rule cover an account?"""
        return all(pattern(attrs[name]) for name, pattern in self.fields if name in attrs)

    def __call__(self, attrs: Mapping[str, str | None], headers: Mapping[str, str]) -> bool:
        for name, pattern in self.fields:
            if not pattern(attrs.get(name)):
                return False
        return all(pattern(headers.get(name)) for name, pattern in self.headers)
