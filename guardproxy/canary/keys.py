"""Keys and the keyed site function.

Everything is derived from one master secret (the policy's ``canary.secret``). At each
site, one HMAC of the site's left context decides, with independent bits of the digest:
whether the site is marked at all (``rate``), whether it carries the global mark or the
account's code, the global choice, and for account sites which bit of the account's
codeword it carries and a mask that balances the two words of the pair.

An account's codeword is 256 pseudo-random bits (an HMAC of its id). Its first 32 bits,
the *tag*, let detection find candidates in one pass by looking tags up; the other 224
make the evidence against every *other* account honest: two accounts' codewords agree
on each position by chance, so a text is attributed by how many distinct positions
agree, and 32 positions alone could never separate one account from 10^6 others at
p < 1e-6. Half of the account sites carry a tag bit, half a check bit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from guardproxy.canary.slots import CHANNELS

TAG_BITS = 32        # codeword positions 0..31: the lookup tag
CODE_BITS = 256      # positions 32..255: check bits
ZW_ZERO, ZW_ONE = "\u200b", "\u200c"  # tripwire: zero-width space / non-joiner


@dataclass(frozen=True, slots=True)
class Site:
    marked: bool
    is_global: bool
    global_choice: int    # member index the global key prefers
    position: int         # which tag bit an account site carries
    mask: int


@dataclass(frozen=True, slots=True)
class Tripwire:
    present: bool
    position: int
    mask: int


class CanaryKeys:
    def __init__(self, secret: str | bytes, rate: float = 1.0,
                 channels: Iterable[str] = CHANNELS, tripwire: bool = True) -> None:
        master = secret.encode() if isinstance(secret, str) else secret
        self.channels = frozenset(channels)  # the mark channels text is read for
        self.read_wires = tripwire           # whether zero-width bits are read back
        self.site_key = hmac.digest(master, b"guardproxy/canary/site", "sha256")
        self.tag_key = hmac.digest(master, b"guardproxy/canary/tag", "sha256")
        self.wire_key = hmac.digest(master, b"guardproxy/canary/tripwire", "sha256")
        self.threshold = int(min(max(rate, 0.0), 1.0) * 0xFFFFFFFF)

    def code(self, account: str) -> int:
        """The account's 256-bit codeword, carried bit by bit by account sites."""
        digest = hmac.digest(self.tag_key, account.encode(), "sha256")
        return int.from_bytes(digest[:4], "big") | int.from_bytes(digest[4:], "big") << TAG_BITS

    def tag(self, account: str) -> int:
        """The codeword's first 32 bits, by which detection looks accounts up."""
        return self.code(account) & ((1 << TAG_BITS) - 1)

    def site(self, context: bytes) -> Site:
        d = hmac.digest(self.site_key, context, "sha256")
        return Site(
            marked=int.from_bytes(d[0:4], "big") <= self.threshold,
            is_global=d[4] & 1 == 0,
            global_choice=d[5] & 1,
            position=_position(d[9], int.from_bytes(d[6:8], "big")),
            mask=d[8] & 1,
        )

    def tripwire(self, context: bytes) -> Tripwire:
        d = hmac.digest(self.wire_key, context, "sha256")
        return Tripwire(present=d[0] < 32, position=_position(d[3], int.from_bytes(d[4:6], "big")),
                        mask=d[2] & 1)


def _position(selector: int, value: int) -> int:
    """A tag position (0..31) or a check position (32..255), each half of the time."""
    if selector & 1 == 0:
        return value % TAG_BITS
    return TAG_BITS + value % (CODE_BITS - TAG_BITS)


def random_keys(count: int, seed: bytes = b"null") -> list[CanaryKeys]:
    """Keys nobody used, for the empirical null distribution of a score."""
    return [CanaryKeys(hashlib.sha256(seed + i.to_bytes(4, "big")).digest())
            for i in range(count)]
