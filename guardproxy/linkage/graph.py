"""The link graph: the reference semantics of account linkage, in memory, synchronous.

    graph = LinkGraph(settings)
    graph.record("acct-1", observe(settings, account, ip, headers), now)   # -> Cluster
    graph.record_pairs([PairEvidence("acct-1", "acct-2", "co_activity")], now)
    graph.cluster("acct-2"); graph.members("acct-2"); graph.links("acct-2"); graph.graph()
    graph.rebuild(now)          # expire evidence, recompute clusters (they may split)

Semantics (the Redis store must match them):

- A *value* is ``(signal, digest)``; it remembers the accounts that showed it with their
  first and last sighting. An account's sighting is *live* while ``last >= now - window``.
- A value is *hot* while more than its signal's ``fanout`` accounts are live on it:
  it stops counting for every pair and is reported instead. Fan-out is counted with an
  exact capped set: a value keeps its ``max(fanout + 1, HOT_COUNT_CAP)`` most recently
  seen accounts, which decides "more than fanout live" exactly (any account dropped is
  older than all kept ones) and reports hot values' sizes up to that cap.
- A pair shares a signal when some live, non-hot value of it holds both accounts, or
  when pair evidence of it (``record_pairs``) is live. Weights add across *distinct*
  signals (two shared IPs weigh as one ``ip:exact``); the pair *links* when the sum
  reaches ``threshold`` (within 1e-9, so 0.7 + 0.3 links at 1.0).
- ``org`` values (``settings.ORG``) are never hot and link each member to the org's
  smallest member: accounts of one declared org are one actor.
- Clusters are the connected components of links (union-find, path compression, the
  smallest account id as root, so a cluster's id is its smallest member).
- A link's evidence, per signal: first seen = when both accounts had shown a shared
  value (the later of their first sightings), last seen = the later of their last
  sightings (min / max over the signal's shared values); pair evidence: its own times.
- Between rebuilds links are only added: a value turning hot or a sighting expiring
  weakens pairs but splits nothing until ``rebuild(now)`` recomputes every pair, link
  and cluster from live evidence. When an account newly shows a value, the value's
  stale sightings are dropped first (least recently seen first: records are expected
  in time order; out-of-order ones are exact again after a rebuild) and its hotness is
  decided again. Signals the settings do not name are ignored.

Memory bounds: at most ``max_values`` values (least recently seen evicted first), each
with at most ``max(fanout + 1, HOT_COUNT_CAP)`` accounts (org values: the org's
accounts); pair entries at most the sum over non-hot values of C(fanout, 2) plus
``max_direct`` pair-evidence entries (least recently seen evicted first); links and
union-find entries at most one per pair / account held. Raw values are never held:
only the digests ``evidence.observe`` made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

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
from guardproxy.linkage.clusters import Clusters
from guardproxy.linkage.events import Event
from guardproxy.linkage.settings import ORG, LinkageSettings, SignalSpec
from guardproxy.linkage.shown import Shown

HOT_COUNT_CAP = 64        # hot values report their account count up to at least this
MAX_VALUES = 250_000     # ~1.5 KB each with their pairs (measured): ~400 MB at most
MAX_DIRECT = 250_000
EPS = 1e-9

Key = tuple[str, str]                           # (signal, digest) or an ordered pair


def pair_key(a: str, b: str) -> Key:
    return (a, b) if a < b else (b, a)


@dataclass(slots=True)
class _Value:
    # account -> (first, last) sighting, least recently seen first (a dict keeps
    # insertion order: a sighting is re-inserted at the end)
    seen: dict[str, tuple[float, float]] = field(default_factory=dict)
    hot: bool = False


@dataclass(slots=True)
class _Pair:
    shared: dict[str, set[str]] = field(default_factory=dict)   # signal -> digests
    direct: dict[str, list[float]] = field(default_factory=dict)  # pair signal -> [first, last]


class LinkGraph:
    """The engine; every ``LinkageStore`` method as a plain method (see the module
    docstring). ``auto_rebuild``: ``record``/``record_pairs`` rebuild first when
    ``settings.rebuild_every`` has passed in *their* time (replaying history).
    ``on_event(kind, fields)`` hears of links made, clusters merged, values turned hot."""

    def __init__(self, settings: LinkageSettings, *, max_values: int = MAX_VALUES,
                 max_direct: int = MAX_DIRECT, auto_rebuild: bool = False,
                 on_event: Event | None = None) -> None:
        self.settings = settings
        self.specs: dict[str, SignalSpec] = {s.id: s for s in settings.signals}
        self.weights = {s.id: s.weight for s in settings.signals} | {ORG: settings.threshold}
        self.max_values = max_values
        self.max_direct = max_direct
        self.auto_rebuild = auto_rebuild
        self.on_event = on_event
        self.values: OrderedDict[Key, _Value] = OrderedDict()
        # values with at most one live holder, least recently seen first: evicted before
        # any shared value (a flood of one account's junk values cannot push out evidence)
        self.single: OrderedDict[Key, None] = OrderedDict()
        self.shown = Shown(settings.max_values_per_account, settings.window, max_values)
        self.pairs: dict[Key, _Pair] = {}
        self.direct: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # LRU order
        self.adjacent: dict[str, set[str]] = {}
        self.clusters = Clusters()
        self.rebuilt_at: float | None = None

    # -- recording ------------------------------------------------------------
    def record(self, account: str, evidence: Iterable[Evidence], now: float) -> Cluster:
        """Add one request's evidence; unknown and pair signals are ignored."""
        self._due(now)
        for ev in evidence:
            spec = self.specs.get(ev.signal)
            if ev.signal == ORG or (spec is not None and not spec.pair):
                self._see(account, spec, ev.signal, ev.digest, now)
        return self.cluster(account)

    def record_pairs(self, pairs: Iterable[PairEvidence], now: float) -> None:
        """Add pair evidence: of a pair signal (prompt similarity, co-activity), or of a
        value signal for a hot value two accounts co-hold (``cohort``)."""
        self._due(now)
        for ev in pairs:
            if ev.signal not in self.specs or ev.a == ev.b:
                continue
            key = pair_key(ev.a, ev.b)
            pair = self.pairs.setdefault(key, _Pair())
            times = pair.direct.get(ev.signal)
            if times is None:
                pair.direct[ev.signal] = [now, now]
                self._check(key, pair, now)
            else:
                times[1] = max(times[1], now)
            self.direct[(*key, ev.signal)] = None
            self.direct.move_to_end((*key, ev.signal))
            while len(self.direct) > self.max_direct:
                a, b, signal = self.direct.popitem(last=False)[0]
                self._drop_direct((a, b), signal)

    def _due(self, now: float) -> None:
        every = self.settings.rebuild_every
        if self.rebuilt_at is None:
            self.rebuilt_at = now
        elif self.auto_rebuild and every > 0 and now - self.rebuilt_at >= every:
            self.rebuild(now)

    def _see(self, account: str, spec: SignalSpec | None, signal: str, digest: str,
             now: float) -> None:
        key = (signal, digest)
        horizon = now - self.settings.window
        value = self.values.get(key)
        entry = value.seen.get(account) if value is not None else None
        if entry is not None and entry[1] >= horizon:   # a live member again: the fast path
            assert value is not None
            self.values.move_to_end(key)
            del value.seen[account]
            value.seen[account] = (entry[0], max(entry[1], now))
            if key in self.single:
                self.single.move_to_end(key)
            return
        if spec is not None and not self.shown.admit(account, signal, digest, now):
            return
        if value is None:
            while len(self.values) >= self.max_values:
                self._evict_value()
            value = self.values[key] = _Value()
            self.single[key] = None
        else:
            self.values.move_to_end(key)
        seen = value.seen
        entry = seen.pop(account, None)
        if entry is not None:   # its own stale sighting: gone with what it shared
            seen[account] = entry
            self._leave(key, value, account)
        while seen:   # stale sightings are the least recently seen: at the front
            oldest = next(iter(seen))
            if seen[oldest][1] >= horizon:
                break
            self._leave(key, value, oldest)
        members = list(seen) if not value.hot or spec is None else []
        seen[account] = (now, now)
        self._single(key, seen)
        if spec is None:   # org: link to its smallest member (a star spans the org)
            if members:
                self._share(account, min(members), signal, digest, now)
            return
        if len(seen) > spec.fanout:
            if not value.hot:
                value.hot = True
                self._withdraw(key, members)
                self._emit("hot", signal=signal, digest=digest, accounts=len(seen))
            while len(seen) > max(spec.fanout + 1, HOT_COUNT_CAP):
                del seen[next(iter(seen))]
            return
        if value.hot:   # back within its fan-out: every live pair counts again
            value.hot = False
            for a, b in combinations(value.seen, 2):
                self._share(a, b, signal, digest, now)
            return
        for other in members:
            self._share(account, other, signal, digest, now)

    def _single(self, key: Key, seen: dict[str, tuple[float, float]]) -> None:
        if len(seen) <= 1:
            self.single[key] = None
            self.single.move_to_end(key)
        else:
            self.single.pop(key, None)

    def _share(self, a: str, b: str, signal: str, digest: str, now: float) -> None:
        key = pair_key(a, b)
        pair = self.pairs.setdefault(key, _Pair())
        digests = pair.shared.setdefault(signal, set())
        fresh = not digests
        digests.add(digest)
        if fresh:
            self._check(key, pair, now)

    def _check(self, key: Key, pair: _Pair, now: float) -> None:
        a, b = key
        if b in self.adjacent.get(a, ()):
            return
        weight = self._weight(pair)
        if weight >= self.settings.threshold - EPS:
            self._emit("link", a=a, b=b, weight=round(weight, 6),
                       signals=sorted(self._signals(pair)), time=now)
            self._link(a, b)

    def _leave(self, key: Key, value: _Value, account: str) -> None:
        """``account``'s sighting of the value is gone: so is what it shared."""
        del value.seen[account]
        self._single(key, value.seen)
        if not value.hot:
            self._withdraw(key, [account], others=list(value.seen))

    def _withdraw(self, key: Key, accounts: list[str], others: list[str] | None = None) -> None:
        """Remove the value's share from the pairs among ``accounts`` (or between them
        and ``others``)."""
        signal, digest = key
        pairs = combinations(accounts, 2) if others is None else (
            (a, b) for a in accounts for b in others)
        for a, b in pairs:
            pair = self.pairs.get(pair_key(a, b))
            digests = pair.shared.get(signal) if pair is not None else None
            if pair is None or digests is None:
                continue
            digests.discard(digest)
            if not digests:
                del pair.shared[signal]
                if not pair.shared and not pair.direct:
                    del self.pairs[pair_key(a, b)]

    def _evict_value(self) -> None:
        if self.single:   # a value nobody shares first: it carries no evidence yet
            key = self.single.popitem(last=False)[0]
            value = self.values.pop(key)
        else:
            key, value = self.values.popitem(last=False)
        if not value.hot:
            self._withdraw(key, list(value.seen))

    def _drop_direct(self, key: Key, signal: str) -> None:
        pair = self.pairs.get(key)
        if pair is not None:
            pair.direct.pop(signal, None)
            if not pair.shared and not pair.direct:
                del self.pairs[key]

    # -- weights and links ------------------------------------------------------
    def _signals(self, pair: _Pair) -> set[str]:
        return {s for s, d in pair.shared.items() if d} | set(pair.direct)

    def _weight(self, pair: _Pair) -> float:
        return sum(self.weights.get(s, 0.0) for s in self._signals(pair))

    def _link(self, a: str, b: str) -> None:
        self.adjacent.setdefault(a, set()).add(b)
        self.adjacent.setdefault(b, set()).add(a)
        merged = self.clusters.union(a, b)
        if merged is not None and self.on_event is not None:
            root, absorbed = merged
            # absorbed: the id that disappeared (its usage is carried, linkage.carry)
            self._emit("merge", cluster=root, absorbed=absorbed,
                       size=self.clusters.size.get(root, 1))

    # -- reading ------------------------------------------------------------------
    def cluster(self, account: str) -> Cluster:
        return self.clusters.cluster(account)

    def linked_to_blocked(self, account: str) -> bool:
        """Whether ``account`` or another account of its cluster is blocked."""
        return self.cluster(account).linked_to_blocked

    def members(self, account: str) -> list[str]:
        return self.clusters.members(account)

    def links(self, account: str) -> list[Link]:
        """The links inside the cluster (made since the last rebuild), sorted, with the
        evidence each pair shares now."""
        out = []
        for a in self.members(account):
            for b in sorted(n for n in self.adjacent.get(a, ()) if n > a):
                out.append(Link(a, b, self._evidence(a, b)))
        return out

    def _evidence(self, a: str, b: str) -> tuple[LinkEvidence, ...]:
        pair = self.pairs.get((a, b))
        if pair is None:
            return ()
        out = []
        for signal, digests in pair.shared.items():
            spans = []
            for digest in digests:
                value = self.values.get((signal, digest))
                ea = value.seen.get(a) if value is not None else None
                eb = value.seen.get(b) if value is not None else None
                if ea is not None and eb is not None:
                    spans.append((max(ea[0], eb[0]), max(ea[1], eb[1])))
            if spans:
                out.append(LinkEvidence(signal, self.weights.get(signal, 0.0),
                                        min(s[0] for s in spans), max(s[1] for s in spans)))
        for signal, (first, last) in pair.direct.items():
            out.append(LinkEvidence(signal, self.weights.get(signal, 0.0), first, last))
        return merged(out)

    def hot_values(self) -> list[HotValue]:
        """Hot values, the most shared first (their sizes counted up to the cap)."""
        hot = [HotValue(s, d, len(v.seen)) for (s, d), v in self.values.items() if v.hot]
        return sorted(hot, key=lambda h: (-h.accounts, h.signal, h.digest))

    def graph(self) -> Graph:
        """Every cluster of 2+ accounts (by id) with its links, and the hot values."""
        clusters = tuple((root, tuple(sorted(members)), tuple(self.links(root)))
                         for root, members in sorted(self.clusters.group.items()))
        return Graph(clusters=clusters, hot_values=tuple(self.hot_values()))

    def stats(self) -> dict[str, int]:
        """Sizes of what is held (the memory bounds in the module docstring)."""
        return {"values": len(self.values), "hot": sum(v.hot for v in self.values.values()),
                "sightings": sum(len(v.seen) for v in self.values.values()),
                "pairs": len(self.pairs), "direct": len(self.direct),
                "links": sum(len(n) for n in self.adjacent.values()) // 2,
                "clusters": len(self.clusters.group), "accounts": len(self.clusters.parent)}

    # -- rebuild and blocklist --------------------------------------------------------
    def rebuild(self, now: float) -> None:
        """Forget sightings and pair evidence older than the window; recompute hot
        values, pairs, links and clusters from what is left (the blocklist stays)."""
        horizon = now - self.settings.window
        self.rebuilt_at = now
        old, self.pairs = self.pairs, {}
        self.single = single = OrderedDict[Key, None]()
        for key in list(self.values):
            signal, digest = key
            value = self.values[key]
            for account in [a for a, e in value.seen.items() if e[1] < horizon]:
                del value.seen[account]
            if not value.seen:
                del self.values[key]
                continue
            if len(value.seen) <= 1:
                single[key] = None
            spec = self.specs.get(signal)
            if spec is None:   # org: a star around the smallest member
                first = min(value.seen)
                shares: Iterable[tuple[str, str]] = ((first, a) for a in value.seen
                                                     if a != first)
            else:
                value.hot = len(value.seen) > spec.fanout
                shares = () if value.hot else combinations(value.seen, 2)
            for a, b in shares:
                pair = self.pairs.setdefault(pair_key(a, b), _Pair())
                pair.shared.setdefault(signal, set()).add(digest)
        direct, self.direct = self.direct, OrderedDict()
        for a, b, signal in direct:   # in least recently seen order, kept
            times = old[(a, b)].direct[signal]
            if times[1] >= horizon:
                self.pairs.setdefault((a, b), _Pair()).direct[signal] = times
                self.direct[(a, b, signal)] = None
        self.adjacent, self.clusters = {}, Clusters(self.clusters.blocked_set)
        threshold = self.settings.threshold - EPS
        for (a, b), pair in sorted(self.pairs.items()):
            if self._weight(pair) >= threshold:
                self.adjacent.setdefault(a, set()).add(b)
                self.adjacent.setdefault(b, set()).add(a)
                self.clusters.union(a, b)

    def block(self, account: str, blocked: bool = True) -> None:
        """Put ``account`` on the blocklist (or take it off)."""
        self.clusters.block(account, blocked)

    def blocked(self) -> list[str]:
        return sorted(self.clusters.blocked_set)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)
