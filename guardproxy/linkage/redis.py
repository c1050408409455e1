"""Account linkage in Redis, shared by every replica: ``LinkGraph``'s semantics in Lua.

    store = RedisLinkageStore(client, key_prefix, settings)
    cluster = await store.record("acct-1", evidence, now)     # ONE EVALSHA

Every operation is one Lua script (``state/lua/linkage_*.lua``), so it is atomic across
replicas, and recording a request's evidence *and* reading its cluster costs one round
trip. All keys carry one hash tag, ``{<prefix>:linkage}``, so they share one Redis
Cluster slot (``redis+cluster://`` works; the whole graph lives on one shard). The
layout is described in ``linkage_common.lua``.

The semantics are ``graph.LinkGraph``'s (the reference; the tests run both on random
operation sequences and compare every answer), with two differences of bounds, not of
meaning: instead of ``LinkGraph``'s least-recently-used caps, a value's sightings and a
pair's evidence expire from Redis ``ttl`` seconds after they were last written
(``window + 2 * rebuild_every``, or ``2 * window`` without scheduled rebuilds). A
rebuild rewrites every live pair, so while rebuilds run (the linkage enricher's
schedule) nothing live ever expires: expiry only bounds what rebuilds would have
removed anyway. ``now`` is the caller's clock (``ingest`` replays history in its own
time), as for ``LinkGraph``.

A rebuild reads the whole graph in one script: it blocks Redis for its duration (about
linear in live sightings plus pairs; see ``bench``), so scheduled rebuilds are skipped
when another replica rebuilt less than half a period ago (``rebuild_if_due``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any

from redis.exceptions import RedisError

from guardproxy.errors import StoreError
from guardproxy.linkage.api import (
    Cluster,
    Evidence,
    Graph,
    HotValue,
    Link,
    LinkEvidence,
    PairEvidence,
    merged,
)
from guardproxy.linkage.events import log_event
from guardproxy.linkage.settings import ORG, LinkageSettings

Event = Callable[[str, dict[str, Any]], None]


def _script(*names: str) -> str:
    return "\n".join(resources.files("guardproxy.state").joinpath(f"lua/{name}")
                     .read_text("utf-8") for name in names)


def cluster_of_reply(out: Sequence[Any]) -> Cluster:
    """A ``cluster(account)`` reply (id, size, blocked 0/1) as a ``Cluster``."""
    return Cluster(id=_text(out[0]), size=int(out[1]), linked_to_blocked=bool(out[2]))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class RedisLinkageStore:
    """``api.LinkageStore`` on Redis, Sentinel or Cluster (see the module docstring).
    ``on_event(kind, fields)`` hears of links made, clusters merged and values turned
    hot, as ``LinkGraph``'s does (default: one JSON log line each)."""

    def __init__(self, client: Any, prefix: str, settings: LinkageSettings, *,
                 on_event: Event | None = log_event, ttl: float | None = None) -> None:
        self.client = client
        self.settings = settings
        self.on_event = on_event
        self.base = f"{prefix}:linkage:{{{prefix}:linkage}}"
        every = settings.rebuild_every
        self.ttl = int(ttl if ttl is not None else
                       (settings.window + 2 * every if every > 0 else 2 * settings.window)) + 1
        self.value_signals = {s.id for s in settings.signals if not s.pair} | {ORG}
        self.signals = {s.id for s in settings.signals}   # org is never pair evidence
        common = "linkage_common.lua"
        self._record = client.register_script(_script(common, "linkage_record.lua",
                                                      "linkage_record_main.lua"))
        self._pairs = client.register_script(_script(common, "linkage_pairs.lua"))
        self._block = client.register_script(_script(common, "linkage_block.lua"))
        self._read = client.register_script(_script(common, "linkage_read.lua"))
        self._rebuild = client.register_script(_script(common, "linkage_rebuild.lua"))
        signals: list[Any] = []
        for spec in settings.signals:
            signals += [spec.id, repr(spec.weight), spec.fanout if not spec.pair else 0]
        self._signals = [len(settings.signals), *signals]

    def args(self, now: float, *rest: Any) -> list[Any]:
        """Every linkage script's arguments: the common ones (linkage_common.lua), then
        ``rest``."""
        s = self.settings
        return [repr(float(now)), repr(float(s.window)), repr(float(s.threshold)), self.ttl,
                s.max_values_per_account, *self._signals, *rest]

    async def _call(self, script: Any, now: float, *rest: Any) -> Any:
        try:
            return await script(keys=[self.base], args=self.args(now, *rest))
        except RedisError as exc:
            raise StoreError(f"linkage store unavailable: {exc}") from exc

    def events(self, flat: list[Any]) -> None:
        """Report the events a script returned (kind, JSON fields; flat)."""
        if self.on_event is None:
            return
        for i in range(0, len(flat) - 1, 2):
            kind, fields = _text(flat[i]), json.loads(flat[i + 1])
            if kind == "link":
                fields["weight"] = round(float(fields["weight"]), 6)
                fields["signals"] = sorted(fields.get("signals") or [])
            self.on_event(kind, fields)

    # -- recording -------------------------------------------------------------
    async def record(self, account: str, evidence: list[Evidence], now: float,
                     pairs: Sequence[PairEvidence] = ()) -> Cluster:
        out = await self._call(self._record, now, *self.record_args(account, evidence, pairs))
        self.events(out[3:])
        return cluster_of_reply(out)

    def record_args(self, account: str, evidence: Sequence[Evidence],
                    pairs: Sequence[PairEvidence] = ()) -> list[Any]:
        """``record``'s script arguments after the common ones (``args``), as
        ``record_request`` in linkage_record.lua reads them; admission batches send the
        same (``state/admission_redis.py``)."""
        triples: list[str] = []
        for pair in pairs:
            if pair.signal in self.signals and pair.a != pair.b:
                triples += [pair.a, pair.b, pair.signal]
        values: list[str] = []
        for ev in evidence:   # as LinkGraph: unknown and pair signals are ignored
            if ev.signal in self.value_signals:
                values += [ev.signal, ev.digest]
        return [account, len(triples) // 3, *triples, len(values) // 2, *values]

    async def record_pairs(self, pairs: Iterable[PairEvidence], now: float) -> None:
        args: list[str] = []
        for ev in pairs:
            if ev.signal in self.signals and ev.a != ev.b:
                args += [ev.a, ev.b, ev.signal]
        if args:
            self.events(await self._call(self._pairs, now, *args))

    # -- reading -----------------------------------------------------------------
    async def cluster(self, account: str) -> Cluster:
        return cluster_of_reply(await self._call(self._read, 0.0, "cluster", account))

    async def members(self, account: str) -> list[str]:
        return sorted(_text(m) for m in await self._call(self._read, 0.0, "members", account))

    async def links(self, account: str) -> list[Link]:
        return self._links(await self._call(self._read, 0.0, "links", account))

    def _links(self, flat: list[Any]) -> list[Link]:
        out = []
        for i in range(0, len(flat), 3):
            ev = flat[i + 2]
            evidence = merged(LinkEvidence(_text(ev[j]), self.settings.weight(_text(ev[j])),
                                           float(ev[j + 1]), float(ev[j + 2]))
                              for j in range(0, len(ev), 3))
            out.append(Link(_text(flat[i]), _text(flat[i + 1]), evidence))
        return sorted(out, key=lambda link: (link.a, link.b))

    async def graph(self) -> Graph:
        clusters_raw, hot_raw = await self._call(self._read, 0.0, "graph", "")
        clusters = sorted((_text(cid), tuple(sorted(_text(m) for m in members)),
                           tuple(self._links(links)))
                          for cid, members, links in clusters_raw)
        hot = []
        for i in range(0, len(hot_raw), 2):
            signal, _, digest = _text(hot_raw[i]).rpartition("|")
            hot.append(HotValue(signal, digest, int(hot_raw[i + 1])))
        hot.sort(key=lambda h: (-h.accounts, h.signal, h.digest))
        return Graph(clusters=tuple(clusters), hot_values=tuple(hot))

    # -- rebuild and blocklist ---------------------------------------------------------
    async def rebuild(self, now: float) -> None:
        await self._call(self._rebuild, now, 0)

    async def rebuild_if_due(self, now: float) -> bool:
        """Rebuild unless some replica did less than half a period ago; True if it did."""
        gap = self.settings.rebuild_every / 2 or 0.001
        return bool(await self._call(self._rebuild, now, repr(float(gap))))

    async def block(self, account: str, blocked: bool = True) -> None:
        await self._call(self._block, 0.0, account, "1" if blocked else "0")

    async def blocked(self) -> list[str]:
        return sorted(_text(m) for m in await self._call(self._read, 0.0, "blocked", ""))

    async def aclose(self) -> None:
        return None   # the client is the state's: State.aclose closes it
