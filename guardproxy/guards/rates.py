"""The rate syntax shared by quotas and budgets: ``20/minute; 500/day``."""

from __future__ import annotations

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
    return items
