"""The policy's top-level ``linkage:`` section: which evidence links accounts.

    linkage:
      secret: ${GUARDPROXY_LINKAGE_SECRET}   # HMAC key (>= 16 characters): never stored or logged
      window: 30d                            # evidence older than this stops counting
      threshold: 1.0                         # a pair links when its shared weight reaches this
      rebuild_every: 1h                      # recompute clusters from live evidence (0: never)
      email_canonical_domains: [gmail.com, googlemail.com]   # dots and +tags ignored there
      signals:
        - {attribute: payment, weight: 1.0, max_fanout: 5}
        - {ip: exact, weight: 0.5, max_fanout: 20}
        - {ip: /24, weight: 0.3, max_fanout: 20}          # IPv6 default: /64 (``ipv6: /56``)
        - {header: x-device-id, weight: 0.6, max_fanout: 5}
        - {prompt_similarity: 0.8, weight: 0.25, min_pairs: 5}
        - {co_activity: 60s, weight: 0.25, min_events: 5}

Each signal entry has exactly one kind key (``attribute``, ``ip``, ``header``,
``prompt_similarity``, ``co_activity``), a ``weight`` (> 0) and optionally
``max_fanout`` (accounts sharing one value before it is *hot*; absent:
``DEFAULT_FANOUT``), ``edge`` (headers: ``true`` when the edge sets the header,
such as a TLS fingerprint: it is read only from requests whose peer is one of
``clients.trusted_proxies``, so a client cannot copy a victim's value; the default
for ``x-ja3*``/``x-ja4*``) and ``family`` (signals of one family observe the same thing:
see ``SignalSpec.family`` and ``cohort``). The signal's id names it in evidence and exports:
``attribute:payment``, ``ip:exact``, ``ip:/24``, ``header:x-device-id``,
``prompt_similarity``, ``co_activity``; ids must be distinct.

IP prefixes: ``ip: /N`` groups IPv4 addresses by their /N network (N in 1..32). IPv6
addresses are grouped by ``ipv6: /M`` when given, else by the default mapping
``ipv6_prefix_for``: /64 for N >= 24 (one IPv6 subscriber or LAN, as a /24 is one
small IPv4 network), /48 for 16 <= N < 24 (one site), /32 for N < 16 (one provider).
``ip: exact`` is the whole address (/32, /128). IPv4-mapped IPv6 addresses count as IPv4.

An account shows at most ``max_values_per_account`` (default 64) values of one signal
new to it within the window; further new values are not recorded for it (counted as
sprays): one account cycling junk device ids cannot push others' evidence out.

Co-activity (see ``similarity``): ``co_activity: 60s`` is the burst length; a pair
counts when at least ``min_events`` of their burst onsets coincide and those are at
least ``min_share`` (default 0.5) of the quieter account's onsets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from guardproxy.policy.reader import Reader
from guardproxy.policy.values import header_name, parse_duration

Kind = Literal["attribute", "ip", "header", "prompt_similarity", "co_activity"]
KINDS: tuple[Kind, ...] = ("attribute", "ip", "header", "prompt_similarity", "co_activity")
PAIR_KINDS = ("prompt_similarity", "co_activity")   # evidence about a pair, found off-path
ORG = "org"                # the implicit signal: accounts of one declared org are one actor
DEFAULT_FANOUT = 100       # a value shared by more accounts says nothing about one actor
MAX_FANOUT = 1000          # the pairs of one value grow as its fan-out squared
MAX_WINDOW = 365 * 86400.0
DEFAULT_VALUES_PER_ACCOUNT = 64
DEFAULT_WINDOW = 30 * 86400.0
DEFAULT_REBUILD = 3600.0
DEFAULT_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
_COMMON = ("weight", "max_fanout", "family")
CLIENT_HEADERS = ("user-agent", "sec-ch-ua", "x-ja3", "x-ja4")   # prefixes: one family
EDGE_HEADERS = ("x-ja3", "x-ja4")   # TLS fingerprints: only the TLS terminator can set them
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "attribute": (), "ip": ("ipv6",), "header": ("edge",),
    "prompt_similarity": ("min_pairs",), "co_activity": ("min_events", "min_share")}
_WINDOW = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|m|h|d|w)?\s*$")
_WINDOW_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                 "w": 7 * 86400.0, None: 1.0}
_PREFIX = re.compile(r"^\s*/?\s*(\d{1,3})\s*$")


@dataclass(frozen=True)
class SignalSpec:
    """One entry of ``linkage.signals``; only the fields of its kind are meaningful.

    ``name``: the attribute name, or the header name in lower case. ``prefix`` /
    ``prefix6``: the IPv4 / IPv6 network length (32 / 128: exact). ``similarity``:
    the estimated Jaccard similarity of word shingles at which two prompts are
    near-duplicates. ``min_pairs``: near-duplicate prompts a pair needs. ``burst``:
    seconds within which burst onsets coincide. ``min_events``, ``min_share``: see the
    module docstring."""

    id: str
    kind: Kind
    weight: float
    max_fanout: int | None = None
    name: str = ""
    prefix: int = 32
    prefix6: int = 128
    similarity: float = 0.0
    min_pairs: int = 5
    burst: float = 0.0
    min_events: int = 5
    min_share: float = 0.5
    declared_family: str = ""   # the policy's ``family:``; empty: the default below
    edge: bool = False          # a header set by the edge: believed from trusted proxies only

    @property
    def family(self) -> str:
        """Signals of one family observe the same thing and never corroborate each
        other (``cohort``): ``family:`` when given; else both IP signals are ``ip``,
        client-software headers (``CLIENT_HEADERS``) are ``client``, any other
        signal is its own."""
        if self.declared_family:
            return self.declared_family
        if self.kind == "ip":
            return "ip"
        if self.kind == "header" and self.name.startswith(CLIENT_HEADERS):
            return "client"
        return self.id

    @property
    def fanout(self) -> int:
        """The effective fan-out cap: ``max_fanout`` or ``DEFAULT_FANOUT``."""
        return self.max_fanout if self.max_fanout is not None else DEFAULT_FANOUT

    @property
    def pair(self) -> bool:
        """Evidence about a pair directly (prompt similarity, co-activity)."""
        return self.kind in PAIR_KINDS


@dataclass(frozen=True)
class LinkageSettings:
    """The parsed ``linkage:`` section. Times in seconds. Hashable (a state key).

    The secret is left out of ``repr`` (and so out of every log line)."""

    secret: str = field(repr=False)
    window: float = DEFAULT_WINDOW
    threshold: float = 1.0
    signals: tuple[SignalSpec, ...] = ()
    email_canonical_domains: frozenset[str] = DEFAULT_DOMAINS
    rebuild_every: float = DEFAULT_REBUILD   # 0: never (only on demand)
    # new values an account may show per signal within the window; beyond, its further
    # new values are not recorded (a spray says nothing, and must not push out others')
    max_values_per_account: int = DEFAULT_VALUES_PER_ACCOUNT

    def signal(self, signal_id: str) -> SignalSpec | None:
        return next((s for s in self.signals if s.id == signal_id), None)

    def weight(self, signal_id: str) -> float:
        """A signal's weight; the implicit ``org`` signal weighs ``threshold`` (it links
        alone); an unknown signal weighs 0."""
        if signal_id == ORG:
            return self.threshold
        spec = self.signal(signal_id)
        return spec.weight if spec is not None else 0.0


def ipv6_prefix_for(prefix: int) -> int:
    """The default IPv6 network length for an IPv4 ``/prefix`` spec (module docstring)."""
    if prefix >= 32:
        return 128
    if prefix >= 24:
        return 64
    return 48 if prefix >= 16 else 32


def parse_window(value: Any) -> float:
    """``30d``, ``2w``, ``12h``, ``90m``, ``60s``, ``250ms`` or seconds -> seconds in
    (0, 365d]. Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r} (expected e.g. 30d, 12h, 60s)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _WINDOW.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {str(value)[:40]!r} (expected e.g. 30d, "
                             "12h, 60s)")
        seconds = float(match.group(1)) * _WINDOW_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    if seconds > MAX_WINDOW:
        raise ValueError(f"must be at most 365d, got {value!r}")
    return seconds


def _rebuild_every(value: Any) -> float:
    if value in (0, "0", 0.0) and not isinstance(value, bool):
        return 0.0
    return parse_window(value)


def parse_linkage(top: Reader) -> LinkageSettings | None:
    """The ``linkage:`` section of the policy whose top-level reader is ``top``; None
    when absent. Problems (``file:line: linkage.…: message``) go to ``top.problems``."""
    if not top.has("linkage"):
        return None
    r = top.child("linkage")
    if r is None:
        if top.raw("linkage") is None:
            top.problem("empty: give secret and signals, or remove 'linkage'", "linkage")
        return None
    r.allow(("secret", "window", "threshold", "signals", "email_canonical_domains",
             "rebuild_every", "max_values_per_account"), required=("secret", "signals"))
    secret = r.string("secret") or ""
    # an unset ${VARIABLE} is already a problem at this path: one message is enough
    reported = any(p.path == r.sub("secret") for p in r.problems)
    if r.has("secret") and len(secret) < 16 and not reported:
        r.problem("must be at least 16 characters (use a random secret)", "secret")
    window = r.parsed("window", parse_window, DEFAULT_WINDOW)
    threshold = r.typed("threshold", float, 1.0)
    if threshold is None or not (math.isfinite(threshold) and threshold > 0):
        r.problem("must be a positive number", "threshold")
        threshold = 1.0
    rebuild = r.parsed("rebuild_every", _rebuild_every, min(DEFAULT_REBUILD, window))
    if rebuild > window:
        r.problem("must not be longer than the window", "rebuild_every")
    domains = DEFAULT_DOMAINS
    if r.has("email_canonical_domains"):
        domains = frozenset(d.strip().lower().lstrip("@")
                            for d in r.string_list("email_canonical_domains"))
    signals = _signals(r, window)
    return LinkageSettings(secret=secret, window=window, threshold=threshold,
                           signals=signals, email_canonical_domains=domains,
                           rebuild_every=rebuild,
                           max_values_per_account=r.positive_int(
                               "max_values_per_account", DEFAULT_VALUES_PER_ACCOUNT,
                               maximum=100_000))


def _signals(r: Reader, window: float) -> tuple[SignalSpec, ...]:
    if r.has("signals") and r.raw("signals") in (None, []):
        r.problem("no signals: give at least one", "signals")
    out: list[SignalSpec] = []
    seen: dict[str, int] = {}
    for s in r.children("signals"):
        present = [k for k in KINDS if s.has(k)]
        if len(present) != 1:
            s.problem(f"a signal needs exactly one of: {', '.join(KINDS)}" if not present
                      else f"a signal has one kind; found {', '.join(present)}")
            s.allow((*KINDS, *_COMMON, *{k for keys in _KIND_KEYS.values() for k in keys}))
            continue
        kind = present[0]
        s.allow((kind, *_COMMON, *_KIND_KEYS[kind]), required=("weight",))
        spec = _signal(s, kind, window)
        if spec is None:
            continue
        if spec.id in seen:
            s.problem(f"duplicate signal {spec.id!r} (first at line {seen[spec.id]})", kind)
            continue
        seen[spec.id] = s.line(kind)
        out.append(spec)
    return tuple(out)


def _signal(s: Reader, kind: Kind, window: float) -> SignalSpec | None:
    weight = s.typed("weight", float, None)
    if weight is not None and not (math.isfinite(weight) and weight > 0):
        s.problem("must be a positive number", "weight")
        weight = None
    fanout = s.positive_int("max_fanout", DEFAULT_FANOUT, maximum=MAX_FANOUT) \
        if s.has("max_fanout") else None
    if s.raw(kind) is None:
        s.problem("no value: give one (see the linkage documentation)", kind)
        return None
    if weight is None:
        return None
    family = (s.string("family") or "").strip() if s.has("family") else ""
    common: dict[str, Any] = {"kind": kind, "weight": weight, "max_fanout": fanout,
                              "declared_family": family}
    if kind == "attribute":
        name = s.string("attribute") or ""
        if not name.strip():
            s.problem("must name an account attribute (payment, email, phone…)", kind)
            return None
        return SignalSpec(id=f"attribute:{name.strip()}", name=name.strip(), **common)
    if kind == "header":
        name = s.string("header") or ""
        try:
            header_name(name)
        except ValueError as exc:
            s.problem(str(exc), kind)
            return None
        edge = bool(s.typed("edge", bool, name.lower().startswith(EDGE_HEADERS)))
        return SignalSpec(id=f"header:{name.lower()}", name=name.lower(), edge=edge, **common)
    if kind == "ip":
        return _ip(s, common)
    if kind == "prompt_similarity":
        similarity = s.typed("prompt_similarity", float, None)
        if similarity is None or not 0.0 < similarity <= 1.0:
            if similarity is not None:
                s.problem("must be a similarity in (0, 1], e.g. 0.8", kind)
            return None
        return SignalSpec(id=kind, similarity=similarity,
                          min_pairs=s.positive_int("min_pairs", 5), **common)
    burst = s.parsed("co_activity", parse_duration, 0.0)
    if burst > window:
        s.problem("a burst must be shorter than the window", kind)
        return None
    share = s.typed("min_share", float, 0.5)
    if share is None or not 0.0 < share <= 1.0:
        s.problem("must be a share in (0, 1]", "min_share")
        share = 0.5
    if burst <= 0:
        return None
    return SignalSpec(id=kind, burst=burst, min_events=s.positive_int("min_events", 5),
                      min_share=share, **common)


def _ip(s: Reader, common: dict[str, Any]) -> SignalSpec | None:
    prefix = _prefix(s, "ip", 32)
    if prefix is None:
        return None
    prefix6 = ipv6_prefix_for(prefix)
    if s.has("ipv6"):
        given = _prefix(s, "ipv6", 128)
        if given is None:
            return None
        prefix6 = given
    name = "exact" if prefix == 32 and not s.has("ipv6") else f"/{prefix}"
    if s.has("ipv6"):
        name += f",v6/{prefix6}"
    return SignalSpec(id=f"ip:{name}", prefix=prefix, prefix6=prefix6, **common)


def _prefix(s: Reader, key: str, bits: int) -> int | None:
    value = s.string(key) or ""
    if value.strip() == "exact":
        return bits
    match = _PREFIX.match(value)
    if match and 1 <= int(match.group(1)) <= bits:
        return int(match.group(1))
    hint = " (for IPv6 networks add ipv6: /M)" if key == "ip" else ""
    s.problem(f"must be 'exact' or a network length /1 to /{bits}, got {value!r}{hint}", key)
    return None
