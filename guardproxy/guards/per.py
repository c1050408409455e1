"""``per:`` — what a rule counts separately: one counter per account, org, IP, …

``header:<name>`` counts per value of a request header. Several keys may be given
as a list (``per: [account, model]``) and are combined. Later modules add keys
(``cluster`` with account linkage) by defining their own ``PER_KEYS``.

A request that lacks a key's value (no such header) is counted under the empty value,
all such requests together: a rule is never skipped because a request left a field out.
``ip`` counts IPv6 clients per /64, since one subscriber gets a whole /64.
``cluster`` counts per linked cluster (account linkage, ``guardproxy.linkage``): the
cluster's id when the policy has ``linkage:``, else the account's id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards.base import PerKey
from guardproxy.identity.client_ip import ip_key
from guardproxy.linkage.api import Cluster
from guardproxy.state.admission import Template, escape

CLUSTER = "cluster"              # exchange.notes: the request's linkage.api.Cluster
CLUSTER_ERROR = "cluster_error"  # exchange.notes: the StoreError recording it met
# exchange.notes[CLUSTER] while the record waits for the admission batch: a key naming
# the cluster then holds MARK where the escaped id goes (admission.Template), and only
# there, since _escaped writes a NUL of any real value as %00
class _Pending(str):
    """The pending cluster's id: a type of its own, so that no client value (a plain
    str, which CPython may even share with this one) is ever taken for it."""


PENDING = Cluster(id=_Pending("\x00"), size=0)
MARK = "\x00"


def _account(ex: Exchange) -> str | None:
    return ex.account.id if ex.account else None


def _org(ex: Exchange) -> str | None:
    return ex.account.org if ex.account else None


def _tier(ex: Exchange) -> str | None:
    return ex.account.tier if ex.account else None


def _ip(ex: Exchange) -> str | None:
    return ip_key(ex.client_ip) if ex.client_ip else None


def _model(ex: Exchange) -> str | None:
    return ex.model


def cluster_of(ex: Exchange) -> Cluster | None:
    """The request's linked cluster, None when linkage is off. Raises ``StoreError``
    when recording it failed, inside the asking rule: its ``on_store_error`` decides."""
    error = ex.notes.get(CLUSTER_ERROR)
    if error is not None:
        raise StoreError(str(error))
    cluster: Cluster | None = ex.notes.get(CLUSTER)
    return cluster


def _cluster(ex: Exchange) -> str | None:
    cluster = cluster_of(ex)
    if cluster is PENDING:
        return PENDING.id
    if cluster is not None:
        return cluster.id
    return ex.account.id if ex.account else None


PER_KEYS: dict[str, PerKey] = {
    "account": _account,
    "org": _org,
    "tier": _tier,
    "ip": _ip,
    "model": _model,
    "cluster": _cluster,
}


def header_key(name: str) -> PerKey:
    lowered = name.lower()

    def _header(ex: Exchange) -> str | None:
        return ex.headers.get(lowered)

    return _header


def compile_per(names: tuple[str, ...],
                known: Mapping[str, PerKey]) -> Callable[[Exchange], str]:
    """One function giving the counter key for a request (``account=alice|model=m``)."""
    parts = [header_key(n.partition(":")[2]) if n.startswith("header:") else known[n]
             for n in names]
    labels = tuple(names)
    if len(parts) == 1:
        only, label = parts[0], labels[0]

        def single(ex: Exchange) -> str:
            return f"{label}={_escaped(only(ex))}"

        return single

    def combined(ex: Exchange) -> str:
        return "|".join(f"{label}={_escaped(part(ex))}"
                        for label, part in zip(labels, parts, strict=True))

    return combined


def _escaped(value: str | None) -> str:
    """A client-chosen value cannot forge another key's ``|label=`` part, nor MARK
    (admission/escape does the same to a cluster id)."""
    if not value:
        return ""
    if type(value) is _Pending:
        return MARK
    return escape(value)


def template(key: str) -> Template:
    """A counter key as an admission ``Template``: split where the cluster id goes."""
    return tuple(key.split(MARK)) if MARK in key else (key,)
