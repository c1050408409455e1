"""How many values new to it an account may show per signal within the window.

    shown = Shown(cap=64, window=30 * 86400, max_keys=250_000)
    shown.admit("acct-1", "header:x-device-id", digest, now)   # -> False past the cap

An account cycling junk device ids or addresses would otherwise fill the bounded graph
and push everybody else's evidence out; past ``cap`` values first shown within the
window, its further new values are not recorded (``sprays`` counts them); values it
already showed keep counting. The Redis store keeps the same count in a sorted set per
account and signal (``state/lua/linkage_record.lua``, ``admit``).
"""

from __future__ import annotations

from collections import OrderedDict


class Shown:
    def __init__(self, cap: int, window: float, max_keys: int) -> None:
        self.cap = cap
        self.window = window
        self.max_keys = max_keys
        # (account, signal) -> digest -> first shown; least recently used first
        self.first: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self.sprays = 0

    def admit(self, account: str, signal: str, digest: str, now: float) -> bool:
        key = (account, signal)
        shown = self.first.get(key)
        if shown is None:
            shown = self.first[key] = {}
            while len(self.first) > self.max_keys:
                self.first.popitem(last=False)
        else:
            self.first.move_to_end(key)
        if digest in shown:
            return True
        if len(shown) >= self.cap:
            horizon = now - self.window
            for old in [d for d, first in shown.items() if first < horizon]:
                del shown[old]
            if len(shown) >= self.cap:
                self.sprays += 1
                return False
        shown[digest] = now
        return True
