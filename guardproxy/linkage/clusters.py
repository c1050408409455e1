"""Clusters: union-find over linked accounts, with the blocklist counted per cluster.

    clusters = Clusters()
    clusters.union("acct-2", "acct-1")   # -> ("acct-1", "acct-2"): new root, absorbed root
    clusters.cluster("acct-2")           # -> Cluster(id="acct-1", size=2, ...)

The root of a cluster is its smallest account id (compared as Python compares str),
which is the cluster's id; path compression keeps finds short. Members of clusters of
two or more are kept per root (the smaller list is merged into the larger), so a
cluster's members are read without a scan. ``blocked_in`` counts blocked members per
root, so "linked to a blocked account" is one lookup. Only ``graph.LinkGraph`` uses it;
the Redis store keeps the same semantics in ``state/lua/linkage_common.lua``.
"""

from __future__ import annotations

from guardproxy.linkage.api import Cluster


class Clusters:
    def __init__(self, blocked: set[str] | None = None) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}           # root -> accounts (absent: 1)
        self.group: dict[str, list[str]] = {}    # root -> members, for clusters of 2+
        self.blocked_set: set[str] = blocked if blocked is not None else set()
        self.blocked_in: dict[str, int] = {a: 1 for a in self.blocked_set}  # root -> count

    def find(self, account: str) -> str:
        root = account
        while (up := self.parent.get(root, root)) != root:
            root = up
        while account != root:   # path compression
            up = self.parent[account]
            self.parent[account] = root
            account = up
        return root

    def union(self, a: str, b: str) -> tuple[str, str] | None:
        """Join the clusters of ``a`` and ``b``; (the new root, the root it absorbed),
        None when they were one already."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        if rb < ra:   # the smallest id stays the root: it is the cluster's id
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.parent.setdefault(ra, ra)
        self.size[ra] = self.size.get(ra, 1) + self.size.pop(rb, 1)
        small, large = self.group.pop(rb, [rb]), self.group.pop(ra, [ra])
        if len(small) > len(large):
            small, large = large, small
        large.extend(small)
        self.group[ra] = large
        blocked = self.blocked_in.pop(rb, 0) + self.blocked_in.get(ra, 0)
        if blocked:
            self.blocked_in[ra] = blocked
        return ra, rb

    def cluster(self, account: str) -> Cluster:
        root = self.find(account)
        # the account itself counts: blocking it denies it under linked_to: blocked
        return Cluster(id=root, size=self.size.get(root, 1),
                       linked_to_blocked=self.blocked_in.get(root, 0) > 0)

    def members(self, account: str) -> list[str]:
        return sorted(self.group.get(self.find(account), [account]))

    def block(self, account: str, blocked: bool = True) -> None:
        """Put ``account`` on the blocklist (or take it off)."""
        if blocked == (account in self.blocked_set):
            return
        root = self.find(account)
        count = self.blocked_in.get(root, 0) + (1 if blocked else -1)
        if blocked:
            self.blocked_set.add(account)
        else:
            self.blocked_set.discard(account)
        if count:
            self.blocked_in[root] = count
        else:
            self.blocked_in.pop(root, None)
