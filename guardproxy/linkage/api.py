"""The shapes every part of account linkage shares: evidence, clusters, the store.

Evidence is a keyed digest of a value two accounts may share (a card, an e-mail, an IP
range, a device header): ``Evidence(signal, digest)`` where ``digest`` is an HMAC of
the signal and its canonical value under ``linkage.secret`` — raw values never reach a
store or a log. Prompt similarity and co-activity are evidence about a *pair* of
accounts directly (``PairEvidence``), found off the request path.

Two accounts are *linked* when the weights of the distinct signals they share (values
seen within ``window``, not hot) add up to ``threshold``; a *cluster* is a connected
component of links. A value shared by more than its signal's ``max_fanout`` accounts
is *hot*: it stops counting and is reported instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Evidence:
    signal: str      # the signal's id, e.g. "attribute:payment", "ip:/24", "header:x-ja4"
    digest: str      # hex HMAC of signal and canonical value


@dataclass(frozen=True, slots=True)
class PairEvidence:
    a: str
    b: str
    signal: str      # "prompt_similarity" | "co_activity"


@dataclass(frozen=True, slots=True)
class Cluster:
    id: str          # stable while the cluster keeps its smallest member: that id
    size: int        # accounts in it (1: alone)
    linked_to_blocked: bool = False   # a member (this account too) is on the blocklist


@dataclass(frozen=True, slots=True)
class LinkEvidence:
    signal: str
    weight: float
    first_seen: float    # unix seconds
    last_seen: float


def merged(evidence: Iterable[LinkEvidence]) -> tuple[LinkEvidence, ...]:
    """One entry per signal, sorted by signal: a signal seen both as a shared value and
    as pair evidence (a co-held hot value) spans the earliest first and latest last."""
    out: dict[str, LinkEvidence] = {}
    for e in evidence:
        had = out.get(e.signal)
        out[e.signal] = e if had is None else LinkEvidence(
            e.signal, e.weight, min(had.first_seen, e.first_seen),
            max(had.last_seen, e.last_seen))
    return tuple(out[s] for s in sorted(out))


@dataclass(frozen=True, slots=True)
class Link:
    a: str
    b: str
    evidence: tuple[LinkEvidence, ...]

    @property
    def weight(self) -> float:
        return sum(e.weight for e in self.evidence)


@dataclass(frozen=True, slots=True)
class HotValue:
    signal: str
    digest: str
    accounts: int        # at least max_fanout + 1 (counted up to a cap)


@dataclass(frozen=True)
class Graph:
    """What ``linkage export`` writes (clusters of one account omitted)."""
    clusters: tuple[tuple[str, tuple[str, ...], tuple[Link, ...]], ...]
    hot_values: tuple[HotValue, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        """The export's JSON document; weights rounded to 6 decimals (a sum of float
        weights such as 0.5 + 0.3 would otherwise print as 0.8000000000000002)."""
        return {"clusters": [
            {"id": cid, "accounts": list(accounts),
             "links": [{"a": link.a, "b": link.b, "weight": round(link.weight, 6),
                        "evidence": [{"signal": e.signal, "weight": round(e.weight, 6),
                                      "first_seen": e.first_seen, "last_seen": e.last_seen}
                                     for e in link.evidence]} for link in links]}
            for cid, accounts, links in self.clusters],
            "hot_values": [{"signal": h.signal, "digest": h.digest, "accounts": h.accounts}
                           for h in self.hot_values]}


class LinkageStore(Protocol):
    """Where evidence and clusters live: ``memory://`` in the process, or Redis shared
    by every replica. Every method may raise ``guardproxy.errors.StoreError``."""

    async def record(self, account: str, evidence: list[Evidence], now: float,
                     pairs: Sequence[PairEvidence] = ()) -> Cluster:
        """Add one request's evidence for ``account`` at ``now``, then ``pairs`` (pair
        evidence found on the request path: co-held hot values), and return its
        cluster after the update (one round trip on Redis)."""

    async def record_pairs(self, pairs: list[PairEvidence], now: float) -> None:
        """Add pair evidence found off the request path."""

    async def cluster(self, account: str) -> Cluster: ...

    async def members(self, account: str) -> list[str]:
        """Every account in ``account``'s cluster, sorted."""

    async def links(self, account: str) -> list[Link]:
        """The links inside ``account``'s cluster, with their evidence."""

    async def graph(self) -> Graph: ...

    async def rebuild(self, now: float) -> None:
        """Forget evidence older than the window and recompute clusters from what is
        left (clusters split again when evidence expires or is removed)."""

    async def block(self, account: str, blocked: bool = True) -> None: ...

    async def blocked(self) -> list[str]: ...

    async def aclose(self) -> None: ...
