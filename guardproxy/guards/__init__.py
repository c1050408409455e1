"""Guards: the rule kinds that decide on a request before it is forwarded.

Every module in this package that defines ``KIND`` is a rule kind, and every module
that defines ``PER_KEYS`` adds ``per:`` keys. They are discovered here, once, so adding
a kind means adding a module.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from guardproxy.guards.base import (
    Guard,
    Outcome,
    PerKey,
    Phase,
    RateHeaders,
    RuleKind,
    Runtime,
)

__all__ = ["Guard", "Outcome", "Phase", "RateHeaders", "RuleKind", "Runtime",
           "per_keys", "rule_kinds"]


def _modules() -> list[object]:
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]


@functools.cache
def rule_kinds() -> Mapping[str, RuleKind]:
    kinds = {}
    for module in _modules():
        kind = getattr(module, "KIND", None)
        if isinstance(kind, RuleKind):
            kinds[kind.key] = kind
    return MappingProxyType(kinds)


@functools.cache
def per_keys() -> Mapping[str, PerKey]:
    keys: dict[str, PerKey] = {}
    for module in _modules():
        keys.update(getattr(module, "PER_KEYS", {}))
    return MappingProxyType(keys)
