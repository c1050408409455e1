"""The client's address: the peer, or X-Forwarded-For when the peer is a trusted proxy.

Addresses are normalized wherever they are read: an IPv4-mapped IPv6 address
(``::ffff:1.2.3.4``, as dual-stack sockets report IPv4 peers) is the IPv4 address, and a
port (``1.2.3.4:5678``, ``[2001:db8::1]:443``) or brackets are removed. Nothing here
raises on a malformed header: a request must never fail because of its X-Forwarded-For.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from guardproxy.policy.model import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or a forwarded hop, or None if it is not one.

    Accepts ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:443``, surrounding quotes, and IPv4-mapped IPv6 (returned as IPv4).
    """
    text = text.strip().strip('"').strip()
    if text.startswith("["):                 # [v6] or [v6]:port
        text, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
    elif text.count(":") == 1:               # v4:port (a bare v6 has two colons or more)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPAddress | None, networks: tuple[IPNetwork, ...]) -> bool:
    return ip is not None and any(ip in net for net in networks)


def forwarded_for(raw_headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Every X-Forwarded-For line of an ASGI header list, in order, joined with ", ".

    Several lines are one list (RFC 9110 5.3): a proxy may append its own line instead
    of extending the last one. "" when there is none.
    """
    lines = (value.decode("latin-1").strip() for name, value in raw_headers
             if name.lower() == b"x-forwarded-for")
    return ", ".join(line for line in lines if line)


def client_ip(peer: str, forwarded: str | Mapping[str, str],
              trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address, normalized (see ``parse_ip``).

    ``forwarded`` is the joined X-Forwarded-For (``forwarded_for``); a header mapping is
    also accepted, read at ``x-forwarded-for`` (one line only: prefer the joined value).

    An untrusted peer's X-Forwarded-For is ignored: the peer is the client. From a trusted
    peer, the hops are walked right to left while they are trusted; the first untrusted
    hop is the client, and when every hop is trusted, the left-most one is.

    A hop that is not an address (``unknown``, garbage) where the walk reaches it stops
    the walk: the client is the trusted hop just right of it (or the peer, when it is
    the right-most hop). Nothing left of it can be believed, since a trusted proxy would
    have written the address it saw; skipping it would let a client choose its own
    address. Attributing such requests to the proxy counts them together: safe.
    """
    if not trusted and ":" not in peer:  # an IPv4 peer, nothing to walk: as the server gave it
        return peer
    peer_ip = parse_ip(peer)
    if not trusted or not _trusted(peer_ip, trusted):
        return str(peer_ip) if peer_ip is not None else peer
    if not isinstance(forwarded, str):
        forwarded = forwarded.get("x-forwarded-for", "")
    hops = [h for h in (h.strip() for h in forwarded.split(",")) if h]
    client = peer_ip
    for hop in reversed(hops):
        ip = parse_ip(hop)
        if ip is None:
            break
        client = ip
        if not _trusted(ip, trusted):
            break
    return str(client)


def is_trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    return bool(trusted) and _trusted(parse_ip(peer), trusted)


def ip_key(address: str, v6_prefix: int = 64) -> str:
    """The ``per: ip`` counter key of an address: IPv4 as is, IPv6 as its network
    (``2001:db8:1:2::/64`` for the default /64, which one subscriber usually gets whole,
    so rotating addresses inside it does not escape the counter). IPv4-mapped IPv6 is
    IPv4. Something that is not an address is returned unchanged.

    Raises ValueError if ``v6_prefix`` is not in 0..128.
    """
    if not 0 <= v6_prefix <= 128:
        raise ValueError(f"v6_prefix must be in 0..128, not {v6_prefix}")
    ip = parse_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    network = ipaddress.IPv6Network((ip.packed, v6_prefix), strict=False)
    return f"{network.network_address}/{v6_prefix}"
