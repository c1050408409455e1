"""Co-held hot values: a crowd that is one actor.

    cohort = CoHeld(settings)
    cohort.add("acct-9", observe(settings, account, ip, headers), now)
    -> [PairEvidence("acct-1", "acct-9", "attribute:payment"), …]

A value shared by more than its signal's ``max_fanout`` accounts is *hot* and counts
for nobody: an office NAT, a carrier's address, a popular client. But a hydra that
runs fifty accounts on one card, one device id and one address makes all three hot,
and the fan-out guard alone would hide it. The two differ in a way that is cheap to
see: strangers meet on *one* crowded value; one actor's accounts hold several values
*of independent sources* at once, and hold them together.

The rule (evaluated off the request path, for the account of each request):

- Each value remembers its ``max(fanout + 1, HOLDERS)`` most recently seen holders
  within the window (as the link graph counts fan-out).
- Signals have a *family* (``SignalSpec.family``): both IP signals are one (an
  address and its range are the same observation), client-software headers are one
  (``user-agent``, ``sec-ch-ua*``, ``x-ja3*``, ``x-ja4*``), every other signal is its
  own; the policy may set ``family:`` to say two headers describe the same thing.
- A hot value V of the request is *co-held* with another value W of the request from
  another family when the holders of V and W are mostly the same accounts: their
  Jaccard similarity is at least ``CO_HELD`` (one half: more than half of everyone
  seen on either is seen on both). Independent values held by strangers overlap
  by chance in about ``|V| |W| / N`` accounts of a population of N, nowhere near half.
- When the families of V and of the values co-held with it weigh at least
  ``threshold`` on their own (each family counted once, by its heaviest signal),
  every account holding V and one of those values gets V's signal as pair evidence
  with this account. Two correlated values that could not link anybody by themselves
  (a client's User-Agent and its JA4) never add anything.

The evidence goes through ``record_pairs`` like prompt similarity: the link's
evidence names the hot value's own signal and weight, with the times the pair was
seen co-holding it. Evaluation happens when the account newly holds a hot value
or a value of the request has just turned hot, so each account is compared once per
change (cost: a few Jaccard products of at most ``HOLDERS`` accounts).

Memory: at most ``max_values`` values (least recently seen evicted first), each with
at most ``max(fanout + 1, HOLDERS)`` holders; an account adds at most
``max_values_per_account`` new values per signal within the window (``shown``), so one
account spraying junk values cannot push the others out. Deterministic (insertion
order).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from guardproxy.linkage.api import Evidence, PairEvidence
from guardproxy.linkage.settings import LinkageSettings, SignalSpec
from guardproxy.linkage.shown import Shown

HOLDERS = 64          # as the link graph's HOT_COUNT_CAP: hot values keep this many
CO_HELD = 0.5         # Jaccard similarity of two values' holders: "mostly the same"
MAX_VALUES = 100_000  # values tracked (~3 KB each at the cap)
EPS = 1e-9

Key = tuple[str, str]   # (signal, digest)


class CoHeld:
    """``add(account, evidence, now)`` -> pair evidence for hot values co-held with
    other values of the same request (see the module docstring). Only value signals
    the settings configure are looked at; ``org`` and pair signals are ignored."""

    def __init__(self, settings: LinkageSettings, *, max_values: int = MAX_VALUES) -> None:
        self.settings = settings
        self.specs: dict[str, SignalSpec] = {s.id: s for s in settings.signals if not s.pair}
        self.max_values = max_values
        # value -> holder -> last seen; least recently seen first
        self.values: OrderedDict[Key, OrderedDict[str, float]] = OrderedDict()
        # the graph's cap on new values per account: a sprayer cannot flush these either
        self.shown = Shown(settings.max_values_per_account, settings.window, max_values)

    @property
    def enabled(self) -> bool:
        """Co-holding needs value signals of at least two families."""
        return len({s.family for s in self.specs.values()}) >= 2

    def add(self, account: str, evidence: Iterable[Evidence], now: float) -> list[PairEvidence]:
        seen: dict[Key, SignalSpec] = {}
        changed = False
        for ev in evidence:
            spec = self.specs.get(ev.signal)
            if spec is None or not self.shown.admit(account, ev.signal, ev.digest, now):
                continue
            key = (ev.signal, ev.digest)
            seen[key] = spec
            changed |= self._see(key, spec, account, now)
        if not changed or len(seen) < 2:
            return []
        hot = [k for k, spec in seen.items() if len(self.values[k]) > spec.fanout]
        found: dict[tuple[str, str, str], None] = {}
        for v in hot:
            spec_v = seen[v]
            holders_v = self.values[v]
            family_weight = {spec_v.family: spec_v.weight}
            partners = []
            for w, spec_w in seen.items():
                if spec_w.family == spec_v.family:
                    continue
                if _jaccard(holders_v, self.values[w]) >= CO_HELD:
                    partners.append(w)
                    family_weight[spec_w.family] = max(
                        family_weight.get(spec_w.family, 0.0), spec_w.weight)
            if not partners or sum(family_weight.values()) < self.settings.threshold - EPS:
                continue
            for w in partners:
                for other in holders_v:
                    if other != account and other in self.values[w]:
                        a, b = (account, other) if account < other else (other, account)
                        found[(a, b, v[0])] = None
        return [PairEvidence(a, b, signal) for a, b, signal in sorted(found)]

    def _see(self, key: Key, spec: SignalSpec, account: str, now: float) -> bool:
        """Record the sighting; whether the account is new on a hot value or the value
        has just turned hot (what calls for an evaluation)."""
        holders = self.values.get(key)
        if holders is None:
            holders = self.values[key] = OrderedDict()
            while len(self.values) > self.max_values:
                self.values.popitem(last=False)
        else:
            self.values.move_to_end(key)
        horizon = now - self.settings.window
        while holders and next(iter(holders.values())) < horizon:
            holders.popitem(last=False)
        was_hot = len(holders) > spec.fanout
        new = account not in holders
        holders[account] = now
        holders.move_to_end(account)
        while len(holders) > max(spec.fanout + 1, HOLDERS):
            holders.popitem(last=False)
        hot = len(holders) > spec.fanout
        return hot and (new or not was_hot)


def _jaccard(a: OrderedDict[str, float], b: OrderedDict[str, float]) -> float:
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    both = sum(1 for x in small if x in large)
    union = len(a) + len(b) - both
    return both / union if union else 0.0
