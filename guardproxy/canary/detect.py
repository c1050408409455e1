"""Forensics: is this text ours, and which account received it?

Each distinct (context, site) is counted once. The global verdict is an exact one-sided
binomial test on the global sites (under the null, text we did not mark matches the
keyed choice with probability 1/2 whatever the writer's own word preferences).

The account is found by likelihood, exhaustively: every codeword position the text
covers gets the majority of its sites' bits, and *every* known account is scored by the
positions that agree with its codeword (``AccountIndex.nearest``), so attribution needs
no tag bits in particular, only enough covered positions. The p-value is the binomial
tail of the agreeing positions. That is exact against both nulls that matter — unmarked
text (a position's majority is then a fair coin, the masks being keyed per site) and
another account's text (two codewords agree on each position by chance) — whereas
counting sites would overstate the evidence against another account, whose sites at one
position all agree or all disagree together. Accounts with as many agreeing positions
are ranked by the vote-margin likelihood (sum of the margins that agree minus those
that disagree: the log-likelihood ratio when each site is flipped with a fixed
probability); the reported p stays the position binomial.

A Bonferroni correction covers the population (every account that could have received
the text, by default the known ones) and, when a corpus has several documents, the
views scored, so that a corpus mixing several accounts' outputs names each contributor.
The views are the whole corpus, each document alone, and *groups* of documents that
look like one source: k-modes on the documents' position majorities splits the corpus
into 2, 4 and 8 groups (same-source documents agree on every position they share,
others on half). Grouping never looks at an account's codeword, so the p-value of every
account in every view stays exact. Views that cover too few positions to name an
account even if all agreed are not scored. The views share the error rate as a
weighted Bonferroni (the union bound; weights as in Holm 1979, Scand. J. Statist. 6):
half to the whole corpus, half split among the other views.

Attribution to a linked *cluster* of accounts (the text mixing several of its accounts)
is not done here yet: it needs the cluster mapping, and would add one view per cluster
scored against the union of its members' codewords.
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

from guardproxy.canary.index import AccountIndex, population_of
from guardproxy.canary.keys import ZW_ONE, ZW_ZERO, CanaryKeys, random_keys
from guardproxy.canary.slots import CHANNELS
from guardproxy.canary.stats import log10_p, z_score
from guardproxy.canary.text import Scanner

__all__ = ["AccountIndex", "AccountScore", "Evidence", "GlobalScore", "Observed", "Verdict",
           "account_bits", "attribute", "detect", "global_score", "group_documents", "observe",
           "position_votes", "score_code"]

NAME_LOG10 = -6.0   # an account is named (and counts towards "mixed") below this corrected p
REPORT = 5          # accounts reported besides every named one
GROUPINGS = (2, 4, 8)   # numbers of sources a corpus is split into (k-modes), besides 1
KMODES_ROUNDS = 20
SOURCE_NOISE = 0.15     # grouping's model: a position's majority flipped this often (k-modes)
_AGREE, _DISAGREE = math.log(2 * (1 - SOURCE_NOISE)), math.log(2 * SOURCE_NOISE)


@dataclass
class Observed:
    words: int = 0
    sites: list[tuple[bytes, int]] = field(default_factory=list)   # (context, member)
    wire: list[tuple[bytes, int]] = field(default_factory=list)    # (context, bit)


def observe(texts: Iterable[str], channels: Container[str] = CHANNELS) -> list[Observed]:
    """One ``Observed`` per text: its words, and the slots of ``channels`` with a choice
    of their own; a context already seen in an earlier text is skipped."""
    seen: set[bytes] = set()
    out = []
    for text in texts:
        obs = Observed()
        for unit in Scanner().feed(text, final=True):
            if unit.word:
                obs.words += 1
                wires = [c for c in unit.zw if c in (ZW_ZERO, ZW_ONE)]
                obs.wire += [(unit.context, int(c == ZW_ONE)) for c in wires[-1:]]
            for slot in unit.slots or ():
                if slot.context and slot.channel in channels and slot.context not in seen:
                    seen.add(slot.context)
                    obs.sites.append((slot.context, slot.member))
        out.append(obs)
    return out


@dataclass
class GlobalScore:
    sites: int
    hits: int

    @property
    def log10_p(self) -> float:
        return log10_p(self.hits, self.sites)

    @property
    def z(self) -> float:
        return z_score(self.hits, self.sites)


@dataclass
class AccountScore:
    account: str
    positions: int          # distinct codeword positions the scored text covers
    hits: int               # of which agree with this account's codeword
    population: int         # accounts that could have received the text
    views: int = 1          # the Bonferroni weight of the view: 1 / its share of alpha
    documents: tuple[int, ...] | None = None   # the group scored; None: the whole corpus
    margin: int = 0         # vote-margin log-likelihood (unscaled): the tie-break

    @property
    def known_accounts(self) -> int:
        return self.population

    @property
    def tests(self) -> int:
        """What the Bonferroni correction multiplies the p-value by."""
        return self.population * self.views

    @property
    def log10_p(self) -> float:
        return log10_p(self.hits, self.positions)

    @property
    def log10_p_bonferroni(self) -> float:
        return min(0.0, self.log10_p + math.log10(max(1, self.tests)))


def global_score(keys: CanaryKeys, sites: list[tuple[bytes, int]]) -> GlobalScore:
    hits = n = 0
    for context, member in sites:
        site = keys.site(context)
        if site.marked and site.is_global:
            n += 1
            hits += member == site.global_choice
    return GlobalScore(n, hits)


def account_bits(keys: CanaryKeys, obs: Observed,
                 tripwire: bool = True) -> list[tuple[int, int]]:
    """(codeword position, bit value) for every account site (and tripwire slot)."""
    bits = []
    for context, member in obs.sites:
        site = keys.site(context)
        if site.marked and not site.is_global:
            bits.append((site.position, member ^ site.mask))
    if tripwire:
        for context, bit in obs.wire:
            slot = keys.tripwire(context)
            if slot.present:
                bits.append((slot.position, bit ^ slot.mask))
    return bits


def _votes(bits: Iterable[tuple[int, int]]) -> dict[int, int]:
    votes: dict[int, int] = {}
    for position, bit in bits:
        votes[position] = votes.get(position, 0) + (1 if bit else -1)
    return votes


def position_votes(bits: list[tuple[int, int]]) -> dict[int, bool]:
    """The majority bit of every codeword position the text covers (ties dropped)."""
    return {position: v > 0 for position, v in _votes(bits).items() if v}


def score_code(majority: dict[int, bool], code: int) -> int:
    return sum(1 for position, bit in majority.items() if bool(code >> position & 1) == bit)


@dataclass(frozen=True)
class Evidence:
    """What a text says about the codeword, as bit masks over the 256 positions."""

    observed: int                          # bit j: the majority at position j is 1
    covered: int                           # bit j: position j has a majority (no tie)
    by_margin: tuple[tuple[int, int], ...]  # (|votes|, the positions with that margin)

    @classmethod
    def of(cls, bits: Iterable[tuple[int, int]]) -> Evidence:
        return cls.of_votes(_votes(bits))

    @classmethod
    def of_votes(cls, votes: dict[int, int]) -> Evidence:
        """From the sum of +1 (bit 1) and -1 (bit 0) votes at each position."""
        observed = covered = 0
        masks: dict[int, int] = {}
        for position, v in votes.items():
            if v:
                covered |= 1 << position
                observed |= (v > 0) << position
                masks[abs(v)] = masks.get(abs(v), 0) | 1 << position
        return cls(observed, covered, tuple(sorted(masks.items())))

    @property
    def positions(self) -> int:
        return self.covered.bit_count()

    def hits(self, code: int) -> int:
        return self.positions - ((code ^ self.observed) & self.covered).bit_count()

    def margin(self, code: int) -> int:
        agree = ~(code ^ self.observed)
        return sum(w * (2 * (agree & m).bit_count() - m.bit_count()) for w, m in self.by_margin)


def _kmodes(votes: list[dict[int, int]], k: int) -> list[list[int]]:
    """Documents split into at most ``k`` groups of apparent sources: k-modes (Huang
    1998, Data Min. Knowl. Discov. 2) on position majorities, from a seeded random
    balanced start. Documents move one at a time, each to the group whose majorities
    are likeliest its source (compared with its own group without itself)."""
    rng = random.Random(k)
    assign = [i % k for i in range(len(votes))]
    rng.shuffle(assign)
    pooled: list[dict[int, int]] = [{} for _ in range(k)]
    for doc, group in zip(votes, assign, strict=True):
        _add(pooled[group], doc, 1)
    for _ in range(KMODES_ROUNDS):
        moved = False
        for d, doc in enumerate(votes):
            _add(pooled[assign[d]], doc, -1)
            # log-likelihood ratio of "same source" to "unrelated" over shared positions:
            # an empty group scores 0, an unrelated one below it
            fits = [sum(_AGREE if (p[j] > 0) == (v > 0) else _DISAGREE
                        for j, v in doc.items() if v and p.get(j, 0))
                    for p in pooled]
            best = max(range(k), key=fits.__getitem__)
            if fits[best] > fits[assign[d]]:
                assign[d], moved = best, True
            _add(pooled[assign[d]], doc, 1)
        if not moved:
            break
    return [m for g in range(k) if (m := [d for d, a in enumerate(assign) if a == g])]


def _add(pooled: dict[int, int], votes: dict[int, int], sign: int) -> None:
    for position, v in votes.items():
        pooled[position] = pooled.get(position, 0) + sign * v


def group_documents(per_doc: list[list[tuple[int, int]]]) -> list[tuple[tuple[int, ...],
                                                                         Evidence]]:
    """Candidate single-source groups of documents, each with its pooled evidence: every
    document alone, and the groups k-modes finds for each of ``GROUPINGS`` sources.
    Uses no codeword, so scoring any group stays exact."""
    votes = [_votes(bits) for bits in per_doc]
    live = [d for d, v in enumerate(votes) if any(v.values())]
    groups: dict[tuple[int, ...], Evidence] = {(d,): Evidence.of_votes(votes[d]) for d in live}
    for k in GROUPINGS:
        if k >= len(live):
            break
        for members in _kmodes([votes[d] for d in live], k):
            key = tuple(live[i] for i in members)
            if key not in groups:
                pooled: dict[int, int] = {}
                for d in key:
                    _add(pooled, votes[d], 1)
                groups[key] = Evidence.of_votes(pooled)
    return list(groups.items())


def _nameable_within(positions: int, tests: int) -> int:
    """The most disagreements at which an account could still be named (-1: none)."""
    d, cost = -1, math.log10(max(1, tests))
    while d < positions and log10_p(positions - d - 1, positions) + cost < NAME_LOG10:
        d += 1
    return d


def _rank(score: AccountScore) -> tuple[float, float, int]:
    return score.log10_p_bonferroni, score.log10_p, -score.margin


def attribute(index: AccountIndex, whole: Evidence,
              groups: list[tuple[tuple[int, ...], Evidence]],
              population: int) -> tuple[list[AccountScore], int]:
    """The accounts that best explain the text, best first, and the number of views
    scored. ``groups``: (documents, their pooled evidence) from ``group_documents`` (a
    corpus of one document passes none); a group that could not name an account even
    if every position agreed, or that is the whole corpus, is not scored alone."""
    alone = [(docs, ev) for docs, ev in groups if ev != whole
             and ev.positions * math.log10(2) > math.log10(max(1, population)) - NAME_LOG10]
    views: list[tuple[tuple[int, ...] | None, Evidence, int]] = [
        (None, whole, 2 if alone else 1)]
    views += [(docs, ev, 2 * len(alone)) for docs, ev in alone]
    best: dict[str, AccountScore] = {}
    codes = index.codes()
    for documents, ev, weight in views:
        if not ev.positions:
            continue
        within = _nameable_within(ev.positions, population * weight)
        for i, distance in index.nearest(ev.observed, ev.covered, REPORT, within):
            score = AccountScore(index.ids[i], ev.positions, ev.positions - distance,
                                 population, weight, documents, ev.margin(codes[i]))
            seen = best.get(score.account)
            if seen is None or _rank(score) < _rank(seen):
                best[score.account] = score
    ranked = sorted(best.values(), key=_rank)
    named = sum(a.log10_p_bonferroni < NAME_LOG10 for a in ranked)
    return ranked[:max(REPORT, named)], len(views)


@dataclass
class Verdict:
    words: int
    global_score: GlobalScore
    accounts: list[AccountScore]
    null_exceed: float           # share of random keys scoring at least as high
    null_max_z: float
    null_keys: int
    population: int = 0
    views: int = 1

    @property
    def mixed(self) -> bool:
        return sum(a.log10_p_bonferroni < NAME_LOG10 for a in self.accounts) > 1

    @property
    def marked(self) -> bool:
        g = self.global_score
        return g.sites > 0 and g.log10_p < -6

    def as_dict(self) -> dict[str, Any]:
        """The verdict as the CLI's ``--json`` and the admin API print it."""
        g = self.global_score
        return {"words": self.words, "global_sites": g.sites, "global_hits": g.hits,
                "log10_p": g.log10_p, "marked": self.marked, "null_keys": self.null_keys,
                "null_exceed": _finite(self.null_exceed), "null_max_z": _finite(self.null_max_z),
                "z": _finite(g.z), "mixed": self.mixed, "population": self.population,
                "views": self.views,
                "accounts": [{"account": a.account, "positions": a.positions, "hits": a.hits,
                              "log10_p": a.log10_p,
                              "log10_p_bonferroni": a.log10_p_bonferroni,
                              "bonferroni_tests": a.tests,
                              "documents": None if a.documents is None else list(a.documents),
                              "margin": a.margin}
                             for a in self.accounts]}


def _finite(value: float) -> float | None:
    """NaN (no null keys, no sites) is not JSON."""
    return value if math.isfinite(value) else None


def detect(keys: CanaryKeys, texts: list[str], accounts: Iterable[str] | AccountIndex,
           null_keys: int = 1000, population: int | None = None) -> Verdict:
    """Score ``texts`` (documents of one corpus). ``population``: how many accounts could
    have received them (default: the known ones; ``ValueError`` if fewer)."""
    index = accounts if isinstance(accounts, AccountIndex) else AccountIndex(keys, accounts)
    count = population_of(index.count, population)
    docs = observe(texts, keys.channels)
    all_sites = [s for d in docs for s in d.sites]
    words = sum(d.words for d in docs)
    g = global_score(keys, all_sites)
    per_doc = [account_bits(keys, doc, keys.read_wires) for doc in docs]
    whole = Evidence.of(b for doc_bits in per_doc for b in doc_bits)
    groups = group_documents(per_doc) if len(docs) > 1 else []
    scores, views = attribute(index, whole, groups, count)
    z = g.z
    null = [global_score(k, all_sites).z for k in random_keys(null_keys)] if null_keys else []
    return Verdict(words=words, global_score=g, accounts=scores,
                   null_exceed=sum(v >= z for v in null) / len(null) if null else math.nan,
                   null_max_z=max(null, default=math.nan), null_keys=len(null),
                   population=count, views=views)
