"""Client address edges: IPv4-mapped peers, ports in hops, several X-Forwarded-For lines,
garbage hops, and the per-IP counter key of IPv6 clients."""

from __future__ import annotations

import ipaddress

import pytest

from guardproxy.identity.client_ip import client_ip, forwarded_for, ip_key, is_trusted, parse_ip

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48"))


@pytest.mark.parametrize(("text", "expected"), [
    ("1.2.3.4", "1.2.3.4"),
    (" 1.2.3.4:5678 ", "1.2.3.4"),
    ("::ffff:1.2.3.4", "1.2.3.4"),
    ("[::ffff:1.2.3.4]:80", "1.2.3.4"),
    ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ('"[2001:db8::1]:443"', "2001:db8::1"),
    ("2001:DB8:0::1", "2001:db8::1"),
])
def test_parse_ip_normalizes(text: str, expected: str) -> None:
    assert str(parse_ip(text)) == expected


@pytest.mark.parametrize("text", ["", "unknown", "_hidden", "1.2.3.4:http", "1.2.3",
                                  "[2001:db8::1", "[2001:db8::1]443", "[1.2.3.4]x",
                                  "999.1.1.1", "::ffff:1.2.3.4:80:1", "a:b"])
def test_parse_ip_refuses_garbage(text: str) -> None:
    assert parse_ip(text) is None


def test_ipv4_mapped_peer_is_the_ipv4_address() -> None:
    # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    assert client_ip("::ffff:198.51.100.7", "", TRUSTED) == "198.51.100.7"
    assert is_trusted("::ffff:10.0.0.5", TRUSTED)
    assert client_ip("::ffff:10.0.0.5", "203.0.113.9", TRUSTED) == "203.0.113.9"
    assert client_ip("10.0.0.5", "::ffff:203.0.113.9", TRUSTED) == "203.0.113.9"


def test_ports_in_hops_are_stripped_and_do_not_defeat_trust() -> None:
    assert client_ip("10.0.0.5", "203.0.113.9:5678, 10.1.1.1:443", TRUSTED) == "203.0.113.9"
    assert client_ip("10.0.0.5", "[2001:db8::1]:443, [2001:db8:ffff::2]:80",
                     TRUSTED) == "2001:db8::1"


def test_several_forwarded_for_lines_are_one_list_in_order() -> None:
    raw = [(b"host", b"proxy"), (b"x-forwarded-for", b"1.2.3.4, 203.0.113.9"),
           (b"accept", b"*/*"), (b"X-Forwarded-For", b" 10.1.1.1 "),
           (b"x-forwarded-for", b"")]
    joined = forwarded_for(raw)
    assert joined == "1.2.3.4, 203.0.113.9, 10.1.1.1"
    # with last-line-wins the client would be the trusted proxy 10.1.1.1 (its own line)
    assert client_ip("10.0.0.5", joined, TRUSTED) == "203.0.113.9"
    assert forwarded_for([(b"host", b"x")]) == ""


def test_untrusted_peer_ignores_forwarded_for() -> None:
    assert client_ip("198.51.100.7", "203.0.113.9", TRUSTED) == "198.51.100.7"
    assert client_ip("198.51.100.7", "203.0.113.9", ()) == "198.51.100.7"
    assert client_ip("", "203.0.113.9", TRUSTED) == ""  # no peer (e.g. a unix socket)


def test_all_hops_trusted_means_the_left_most() -> None:
    assert client_ip("10.0.0.5", "10.9.9.9, 10.1.1.1", TRUSTED) == "10.9.9.9"


@pytest.mark.parametrize(("forwarded", "expected"), [
    # garbage where the walk reaches it: the trusted hop right of it is the client
    ("203.0.113.9, unknown, 10.1.1.1", "10.1.1.1"),
    # garbage right-most: the peer is the client; nothing left of it is believed
    ("203.0.113.9, not-an-ip", "10.0.0.5"),
    ("1.2.3.4, ,, 10.1.1.1:99999x", "10.0.0.5"),
    # garbage left of the first untrusted hop is never reached
    ("garbage, 203.0.113.9, 10.1.1.1", "203.0.113.9"),
])
def test_garbage_hops_stop_the_walk_safely(forwarded: str, expected: str) -> None:
    assert client_ip("10.0.0.5", forwarded, TRUSTED) == expected


def test_spoofed_rotation_behind_garbage_counts_as_one_client() -> None:
    # a client that puts garbage after its chosen addresses cannot pick its key
    keys = {client_ip("10.0.0.5", f"203.0.113.{i}, x, 10.1.1.1", TRUSTED) for i in range(5)}
    assert keys == {"10.1.1.1"}


def test_header_mapping_still_accepted() -> None:
    assert client_ip("10.0.0.5", {"x-forwarded-for": "203.0.113.9"}, TRUSTED) == "203.0.113.9"
    assert client_ip("10.0.0.5", {}, TRUSTED) == "10.0.0.5"


@pytest.mark.parametrize(("address", "expected"), [
    ("203.0.113.9", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::1]:443", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-ip", "not-an-ip"),
    ("", ""),
])
def test_ip_key(address: str, expected: str) -> None:
    assert ip_key(address) == expected


def test_ip_key_v6_rotation_inside_a_prefix_is_one_key() -> None:
    keys = {ip_key(f"2001:db8:1:2:{i:x}::{i:x}") for i in range(1, 200)}
    assert keys == {"2001:db8:1:2::/64"}
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("2001:db8:1:2:3::1", v6_prefix=48) == "2001:db8:1::/48"
    assert ip_key("2001:db8::1", v6_prefix=128) == "2001:db8::1/128"
    with pytest.raises(ValueError):
        ip_key("2001:db8::1", v6_prefix=129)
