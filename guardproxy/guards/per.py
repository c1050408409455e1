"""``per:`` — what a rule counts separately: one counter per account, org, IP, …

``header:<name>`` counts per value of a request header. Several keys may be given
as a list (``per: [account, model]``) and are combined. Later modules add keys
(``cluster`` with account linkage) by defining their own ``PER_KEYS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from guardproxy.exchange import Exchange
from guardproxy.guards.base import PerKey


def _account(ex: Exchange) -> str | None:
    return ex.account.id if ex.account else None


def _org(ex: Exchange) -> str | None:
    return ex.account.org if ex.account else None


def _tier(ex: Exchange) -> str | None:
    return ex.account.tier if ex.account else None


def _ip(ex: Exchange) -> str | None:
    return ex.client_ip or None


def _model(ex: Exchange) -> str | None:
    return ex.model


PER_KEYS: dict[str, PerKey] = {
    "account": _account,
    "org": _org,
    "tier": _tier,
    "ip": _ip,
    "model": _model,
}


def header_key(name: str) -> PerKey:
    lowered = name.lower()

    def _header(ex: Exchange) -> str | None:
        return ex.headers.get(lowered)

    return _header


def compile_per(names: tuple[str, ...],
                known: Mapping[str, PerKey]) -> Callable[[Exchange], str | None]:
    """One function giving the counter key for a request, or None when a part is absent."""
    parts = [header_key(n.partition(":")[2]) if n.startswith("header:") else known[n]
             for n in names]
    labels = tuple(names)
    if len(parts) == 1:
        only, label = parts[0], labels[0]

        def single(ex: Exchange) -> str | None:
            value = only(ex)
            return None if value is None else f"{label}={value}"

        return single

    def combined(ex: Exchange) -> str | None:
        values = []
        for label, part in zip(labels, parts, strict=True):
            value = part(ex)
            if value is None:
                return None
            values.append(f"{label}={value}")
        return "|".join(values)

    return combined
