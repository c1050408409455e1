"""Forensics: is this text ours, and which account received it?

Each distinct (context, site) is counted once. The global verdict is an exact one-sided
binomial test on the global sites (under the null, text we did not mark matches the
keyed choice with probability 1/2 whatever the writer's own word preferences).

The account is decoded in one pass: account sites that carry a bit of the 32-bit tag
vote for it; the least certain tag bits are enumerated, and the candidate tags are
looked up among the known accounts. Each candidate is then tested on codeword
*positions*, not sites: every position the text covers gets the majority of its sites'
bits, and the p-value is the binomial tail of the positions that agree with the
candidate's codeword. That is exact against both nulls that matter — unmarked text (a
position's majority is then a fair coin, the masks being keyed per site) and another
account's text (two codewords agree on each position by chance) — whereas counting
sites would overstate the evidence against another account, whose sites at one position
all agree or all disagree together. A Bonferroni correction covers the number of known
accounts. Documents are also decoded one by one, so that a corpus mixing several
accounts' outputs names each contributor instead of one wrong account.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

from guardproxy.canary.keys import TAG_BITS, ZW_ONE, CanaryKeys, random_keys
from guardproxy.canary.stats import log10_p, z_score
from guardproxy.canary.text import Scanner

MAX_FLIPS = 20          # 2**20 candidate tags for a whole corpus (~0.3 s)
DOC_FLIPS = 12          # and 2**12 for each of its documents
MIN_DOC_SITES = 24      # documents with fewer account sites are not decoded alone


@dataclass
class Observed:
    words: int = 0
    sites: list[tuple[bytes, int]] = field(default_factory=list)   # (context, member)
    wire: list[tuple[bytes, int]] = field(default_factory=list)    # (context, bit)


def observe(texts: Iterable[str]) -> list[Observed]:
    """One ``Observed`` per text; a context already seen in an earlier text is skipped."""
    seen: set[bytes] = set()
    out = []
    for text in texts:
        obs = Observed()
        for unit in Scanner().feed(text, final=True):
            if not unit.context:
                continue
            obs.words += 1
            obs.wire += [(unit.context, int(c == ZW_ONE)) for c in unit.zw[-1:]]
            if unit.pair >= 0 and unit.context not in seen:
                seen.add(unit.context)
                obs.sites.append((unit.context, unit.member))
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
    tag: int
    positions: int          # distinct codeword positions the text covers
    hits: int               # of which agree with this account's codeword
    known_accounts: int

    @property
    def log10_p(self) -> float:
        return log10_p(self.hits, self.positions)

    @property
    def log10_p_bonferroni(self) -> float:
        return min(0.0, self.log10_p + math.log10(max(1, self.known_accounts)))


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
    """(tag bit position, bit value) for every account site (and tripwire slot)."""
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


def candidate_tags(bits: list[tuple[int, int]], known: Container[int],
                   flips: int = MAX_FLIPS) -> list[int]:
    votes = [0] * TAG_BITS
    for position, bit in bits:
        if position < TAG_BITS:
            votes[position] += 1 if bit else -1
    tag = sum(1 << i for i, v in enumerate(votes) if v > 0)
    unsure = sorted(range(TAG_BITS), key=lambda i: abs(votes[i]))[:flips]
    found = [tag] if tag in known else []
    for step in range(1, 1 << len(unsure)):  # Gray code: one bit flips per candidate
        tag ^= 1 << unsure[(step & -step).bit_length() - 1]
        if tag in known:
            found.append(tag)
    return found


def position_votes(bits: list[tuple[int, int]]) -> dict[int, bool]:
    """The majority bit of every codeword position the text covers (ties dropped)."""
    votes: dict[int, int] = {}
    for position, bit in bits:
        votes[position] = votes.get(position, 0) + (1 if bit else -1)
    return {position: v > 0 for position, v in votes.items() if v}


def score_code(majority: dict[int, bool], code: int) -> int:
    return sum(1 for position, bit in majority.items() if bool(code >> position & 1) == bit)


@dataclass
class Verdict:
    words: int
    global_score: GlobalScore
    accounts: list[AccountScore]
    null_exceed: float           # share of random keys scoring at least as high
    null_max_z: float
    null_keys: int

    @property
    def mixed(self) -> bool:
        return sum(a.log10_p_bonferroni < -6 for a in self.accounts) > 1

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
                "z": _finite(g.z), "mixed": self.mixed,
                "accounts": [{"account": a.account, "positions": a.positions, "hits": a.hits,
                              "log10_p": a.log10_p,
                              "log10_p_bonferroni": a.log10_p_bonferroni}
                             for a in self.accounts]}


def _finite(value: float) -> float | None:
    """NaN (no null keys, no sites) is not JSON."""
    return value if math.isfinite(value) else None


class AccountIndex:
    """Known accounts by their 32-bit tag; build once, detect many times."""

    def __init__(self, keys: CanaryKeys, accounts: Iterable[str]) -> None:
        # 32-bit tags collide (about 116 pairs among 10^6 accounts): every account under
        # a candidate tag is scored on its own codeword, whose check bits tell them apart
        self.by_tag: dict[int, list[str]] = {}
        self.count = 0
        for account in accounts:
            self.by_tag.setdefault(keys.tag(account), []).append(account)
            self.count += 1


def detect(keys: CanaryKeys, texts: list[str], accounts: Iterable[str] | AccountIndex,
           null_keys: int = 1000) -> Verdict:
    index = accounts if isinstance(accounts, AccountIndex) else AccountIndex(keys, accounts)
    known, count = index.by_tag, index.count
    docs = observe(texts)
    whole = Observed(words=sum(d.words for d in docs),
                     sites=[s for d in docs for s in d.sites])
    g = global_score(keys, whole.sites)
    per_doc = [account_bits(keys, doc) for doc in docs]
    bits = [b for doc_bits in per_doc for b in doc_bits]
    tags = set(candidate_tags(bits, known))
    for doc_bits in per_doc:
        if len(doc_bits) >= MIN_DOC_SITES:
            tags.update(candidate_tags(doc_bits, known, DOC_FLIPS))
    majority = position_votes(bits)
    scores = sorted((AccountScore(account, t, len(majority),
                                  score_code(majority, keys.code(account)), count)
                     for t in tags for account in known[t]), key=lambda a: a.log10_p)
    z = g.z
    null = [global_score(k, whole.sites).z for k in random_keys(null_keys)] if null_keys else []
    return Verdict(words=whole.words, global_score=g, accounts=scores[:5],
                   null_exceed=sum(v >= z for v in null) / len(null) if null else math.nan,
                   null_max_z=max(null, default=math.nan), null_keys=len(null))
