"""A cursor over one mapping of a policy file that types fields and collects problems.

Parsing never stops at the first mistake: every field reports into one problem list
so that ``guardproxy check`` can show all of them, one line each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from guardproxy.errors import Problem
from guardproxy.policy.source import LocDict, LocList, one_line
from guardproxy.policy.values import parse_duration, parse_size

T = TypeVar("T")
_MISSING: Any = object()
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          LocDict: "a mapping", LocList: "a list", type(None): "nothing"}
_INT = re.compile(r"^\s*[+-]?[0-9]{1,18}\s*$")  # ASCII digits only: int("²") fails


class Reader:
    def __init__(self, file: str, node: LocDict, path: str, problems: list[Problem]) -> None:
        self.file = file
        self.node = node
        self.path = path
        self.problems = problems

    # -- locating ------------------------------------------------------------
    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line(self, key: str | None = None) -> int:
        if key is not None and key in self.node.key_lines:
            return self.node.key_lines[key]
        return self.node.line

    def problem(self, message: str, key: str | None = None) -> None:
        path = self.sub(key) if key else self.path
        self.problems.append(Problem(self.file, self.line(key), path, one_line(message)))

    # -- structure -----------------------------------------------------------
    def allow(self, keys: Iterable[str], required: Iterable[str] = ()) -> None:
        allowed = set(keys)
        for key in self.node:
            if key not in allowed:
                self.problem(f"unknown key (expected one of: {', '.join(sorted(allowed))})", key)
        for key in required:
            if key not in self.node:
                self.problem(f"missing required key '{key}'", None)

    def has(self, key: str) -> bool:
        return key in self.node

    def raw(self, key: str, default: Any = None) -> Any:
        return self.node.get(key, default)

    def child(self, key: str) -> Reader | None:
        value = self.node.get(key)
        if value is None:
            return None
        if not isinstance(value, LocDict):
            self.problem("must be a mapping", key)
            return None
        return Reader(self.file, value, self.sub(key), self.problems)

    def children(self, key: str) -> list[Reader]:
        value = self.node.get(key)
        if value is None:
            return []
        if not isinstance(value, LocList):
            self.problem("must be a list", key)
            return []
        out = []
        for i, item in enumerate(value):
            path = f"{self.sub(key)}[{i}]"
            if isinstance(item, LocDict):
                out.append(Reader(self.file, item, path, self.problems))
            else:
                self.problems.append(Problem(self.file, value.item_lines[i], path,
                                             "must be a mapping"))
        return out

    # -- typed scalars -------------------------------------------------------
    def typed(self, key: str, kind: type[T], default: T | None = None,
              *, required: bool = False) -> T | None:
        value = self.node.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                self.problem(f"missing required key '{key}'")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)  # type: ignore[return-value]
            except OverflowError:
                self.problem("number out of range", key)
                return default
        if kind is int and isinstance(value, str) and _INT.match(value):
            return int(value)  # type: ignore[return-value]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.problem(f"must be {_describe(kind)}, got {_describe(type(value))}", key)
            return default
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.node.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return self.typed(key, str, default, required=required)

    def positive_int(self, key: str, default: int, *, maximum: int = 2**53) -> int:
        """An integer in [1, maximum] (a digit string is accepted); ``default`` when
        absent or invalid (and then a problem is recorded)."""
        value = self.typed(key, int, None)
        if value is None:
            return default
        if not 0 < value <= maximum:
            self.problem(f"must be an integer from 1 to {maximum}, got {value}", key)
            return default
        return value

    def duration(self, key: str, default: float) -> float:
        """Seconds from ``300s``, ``5m``, ``250ms``, ``2h`` or a number, in (0, 720h]."""
        return self.parsed(key, parse_duration, default)

    def size(self, key: str, default: int) -> int:
        """Bytes from ``16MiB``, ``64kb`` or a number, in [1, 1GiB]."""
        return self.parsed(key, parse_size, default)

    def choice(self, key: str, options: Iterable[str], default: str) -> str:
        value = self.string(key, default)
        allowed = tuple(options)
        if value not in allowed:
            self.problem(f"must be one of {', '.join(allowed)}; got {value!r}", key)
            return default
        return value

    def string_list(self, key: str, *, nonempty: bool = False) -> tuple[str, ...]:
        """One string or a list of them (integers are taken as text). ``nonempty``:
        an empty list is a problem (in ``when:`` it would match nothing)."""
        value = self.node.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(
                isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            self.problem("must be a string or a list of strings", key)
            return ()
        if nonempty and not value:
            self.problem("an empty list: give at least one value or remove the key", key)
        return tuple(str(v) for v in value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self.node.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem("must be a mapping of strings", key)
            return {}
        out = {}
        for k, v in value.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                self.problem("must be a string", f"{key}.{k}")
                continue
            out[k] = str(v)
        return out

    def parsed(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        """Apply ``parse`` (raising ValueError with a message) to a field."""
        value = self.node.get(key)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(str(exc), key)
            return default


def _describe(kind: type) -> str:
    return _NAMES.get(kind, kind.__name__)
