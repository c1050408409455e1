"""The rate syntax shared by quotas and budgets: ``20/minute; 500/day``.

Items are the ``limits`` library's, but their storage key names the window and not the
amount (``LIMITER/<rule>/<key>/1/minute``): a reload that changes a rule's limit keeps
its counters (the library's own key, ``…/20/1/minute``, would start an empty window).
So a rule may give each window once.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from limits import RateLimitItem, parse_many

MAX_AMOUNT = 2**53
MAX_WINDOW = 366 * 86400


def parse_rates(value: Any) -> tuple[RateLimitItem, ...]:
    if isinstance(value, list):
        value = "; ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a rate such as '20/minute' or '20/minute; 500/day'")
    try:
        items = tuple(parse_many(value))
    except ValueError:
        raise ValueError(
            f"invalid rate {value!r} (expected e.g. '20/minute', '500/day', '10 per second')"
        ) from None
    if not items:
        raise ValueError(f"invalid rate {value!r}")
    if any(item.amount <= 0 for item in items):
        raise ValueError(f"rate amounts must be positive in {value!r}")
    if any(item.amount > MAX_AMOUNT for item in items):  # Lua numbers are doubles
        raise ValueError(f"rate amounts must be at most 2**53 in {value!r}")
    if any(item.get_expiry() > MAX_WINDOW for item in items):
        raise ValueError(f"a window can be at most a year long in {value!r}")
    # by length in seconds: "1/minute; 5/60 seconds" is one window (one counter) twice
    windows = [item.get_expiry() for item in items]
    if len(set(windows)) != len(windows):
        raise ValueError(f"a window is given twice in {value!r}: keep the tighter limit")
    return tuple(_window_keyed(type(item))(item.amount, item.multiples, item.namespace)
                 for item in items)


@cache   # one subclass per granularity (a handful): built once, never changed
def _window_keyed(cls: type[RateLimitItem]) -> type[RateLimitItem]:
    def key_for(self: RateLimitItem, *identifiers: bytes | str | int | float) -> str:
        parts = [k.decode() if isinstance(k, bytes) else str(k) for k in identifiers]
        return "/".join([self.namespace, *parts, str(self.multiples), self.GRANULARITY.name])

    return type(cls.__name__, (cls,), {"key_for": key_for, "__slots__": ()})


def rate_text(item: RateLimitItem) -> str:
    """``20/minute``, ``20/5minutes``: a window as the policy writes it."""
    unit = item.GRANULARITY.name
    return f"{item.amount}/{unit}" if item.multiples == 1 else \
        f"{item.amount}/{item.multiples}{unit}s"
