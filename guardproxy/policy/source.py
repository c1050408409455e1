"""Read YAML into plain Python values that remember their line numbers.

Every mapping becomes a ``LocDict`` and every sequence a ``LocList`` so that a
problem found later, while typing the values, can still name ``file:line``.
``${VAR}`` and ``${VAR:-default}`` in string scalars are expanded from the
environment here, where the line is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from guardproxy.errors import Problem

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class LocDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class LocList(list[Any]):
    line: int = 0
    item_lines: list[int]


class _Converter:
    def __init__(self, file: str, env: Mapping[str, str], problems: list[Problem]) -> None:
        self.file = file
        self.env = env
        self.problems = problems
        self.constructor = yaml.SafeLoader("")

    def convert(self, node: yaml.Node, path: str) -> Any:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out = LocDict()
            out.line, out.key_lines = line, {}
            for key_node, value_node in node.value:
                key = self.constructor.construct_object(key_node)
                key_line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    key = str(key)
                sub = f"{path}.{key}" if path else key
                if key in out:
                    self.problems.append(Problem(self.file, key_line, sub, "duplicate key"))
                    continue
                out[key] = self.convert(value_node, sub)
                out.key_lines[key] = key_line
            return out
        if isinstance(node, yaml.SequenceNode):
            seq = LocList()
            seq.line, seq.item_lines = line, []
            for i, item in enumerate(node.value):
                seq.append(self.convert(item, f"{path}[{i}]"))
                seq.item_lines.append(item.start_mark.line + 1)
            return seq
        value = self.constructor.construct_object(node)
        if isinstance(value, str) and "${" in value:
            value = self._expand(value, line, path)
        return value

    def _expand(self, text: str, line: int, path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value not in (None, ""):
                return str(value)
            if default is not None:
                return default
            self.problems.append(
                Problem(self.file, line, path, f"environment variable {name} is not set "
                        f"(write ${{{name}:-default}} to give a default)")
            )
            return ""

        return _ENV_REF.sub(substitute, text)


def read_yaml(path: Path, env: Mapping[str, str], problems: list[Problem]) -> Any:
    """Parse one YAML file; syntax errors become problems, never exceptions."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(Problem(file, 0, "", f"cannot read file: {exc.strerror or exc}"))
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problems.append(Problem(file, line, "", f"invalid YAML: {exc.problem or exc}"))
        return None
    except yaml.YAMLError as exc:
        problems.append(Problem(file, 0, "", f"invalid YAML: {exc}"))
        return None
    if node is None:
        return None
    try:
        return _Converter(file, env, problems).convert(node, "")
    except yaml.YAMLError as exc:
        problems.append(Problem(file, node.start_mark.line + 1, "", f"invalid YAML: {exc}"))
        return None
