"""``memory://`` linkage: the ``LinkGraph`` of this process behind the async
``LinkageStore`` interface (one replica only; restarting forgets the graph).

Bounds (see ``graph``): at most ``max_values`` values (default 250,000), each holding
at most ``max(fanout + 1, 64)`` sightings; pair entries at most the sum over non-hot
values of C(fanout, 2) plus ``max_direct`` (default 250,000) pair-evidence entries.
Measured (10,000 accounts, 100,000 requests with the issue's signals, 10% of them from
a roaming IP): 54,000 values and 85,000 pairs in 83 MB, ~1.5 KB per value with its
pairs, so the default bound is ~400 MB; pass smaller bounds for smaller hosts. Cluster
decisions are logged by ``graph.log_event``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from guardproxy.linkage.api import Cluster, Evidence, Graph, Link, PairEvidence
from guardproxy.linkage.events import log_event
from guardproxy.linkage.graph import LinkGraph
from guardproxy.linkage.settings import LinkageSettings


class MemoryLinkageStore:
    """``api.LinkageStore`` in memory. Keyword arguments go to ``LinkGraph``
    (``max_values``, ``max_direct``, ``auto_rebuild``, ``on_event``; events are logged
    by default). ``graph_engine`` is the engine itself, for ``ingest`` and tests."""

    def __init__(self, settings: LinkageSettings, **options: Any) -> None:
        options.setdefault("on_event", log_event)
        self.settings = settings
        self.graph_engine = LinkGraph(settings, **options)

    async def record(self, account: str, evidence: list[Evidence], now: float,
                     pairs: Sequence[PairEvidence] = ()) -> Cluster:
        self.graph_engine.record(account, evidence, now)
        if pairs:
            self.graph_engine.record_pairs(pairs, now)
        return self.graph_engine.cluster(account)

    async def record_pairs(self, pairs: Iterable[PairEvidence], now: float) -> None:
        self.graph_engine.record_pairs(pairs, now)

    async def cluster(self, account: str) -> Cluster:
        return self.graph_engine.cluster(account)

    async def members(self, account: str) -> list[str]:
        return self.graph_engine.members(account)

    async def links(self, account: str) -> list[Link]:
        return self.graph_engine.links(account)

    async def graph(self) -> Graph:
        return self.graph_engine.graph()

    async def rebuild(self, now: float) -> None:
        self.graph_engine.rebuild(now)

    async def block(self, account: str, blocked: bool = True) -> None:
        self.graph_engine.block(account, blocked)

    async def blocked(self) -> list[str]:
        return self.graph_engine.blocked()

    async def aclose(self) -> None:
        return None
