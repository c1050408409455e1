"""The client's address: the peer, or X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from guardproxy.policy.model import IPNetwork


def _trusted(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(peer: str, headers: Mapping[str, str], trusted: tuple[IPNetwork, ...]) -> str:
    """Walk X-Forwarded-For right to left through trusted hops; the first untrusted
    address is the client. An untrusted peer's X-Forwarded-For is ignored."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = headers.get("x-forwarded-for")
    if not forwarded:
        return peer
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def is_trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    return bool(trusted) and _trusted(peer, trusted)
