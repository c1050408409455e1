"""A request's evidence: keyed digests of the values its account may share with others.

    observe(settings, account, "203.0.113.9", {"x-device-id": "d-1"})
    -> [Evidence("org", "…"), Evidence("attribute:payment", "…"), Evidence("ip:exact", "…"),
        Evidence("ip:/24", "…"), Evidence("header:x-device-id", "…")]

Each digest is ``HMAC-SHA256(secret, f"{signal id}\\0{canonical value}")`` in hex
(RFC 2104): the same value gives the same digest for every account (so sharing is
visible), a different secret gives unrelated digests, and without the secret a digest
cannot be tested against guesses (a card or phone number has few enough values to
enumerate an unkeyed hash). Raw values never leave this module.

Canonical values: e-mail per ``canonical_email``; phone numbers their digits (a leading
``+`` kept); other attributes and header values trimmed; an IP's network in CIDR form
(see ``settings`` for the prefix lengths). A missing or empty value gives no evidence.
Every account also gives ``org`` evidence for its organisation (``settings.ORG``):
accounts declared in one org are one actor.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import unicodedata
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from guardproxy.linkage.api import Evidence
from guardproxy.linkage.settings import ORG, LinkageSettings, SignalSpec
from guardproxy.policy.model import Account

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# domains that deliver to one mailbox: the key's mailbox is the value's
_DOMAIN_ALIASES: Mapping[str, str] = MappingProxyType({"googlemail.com": "gmail.com"})


def digest(secret: str, signal: str, canonical: str) -> str:
    """The hex HMAC-SHA256 of ``signal`` and a canonical value under ``secret``."""
    message = f"{signal}\0{canonical}".encode("utf-8", "surrogatepass")
    return hmac.new(secret.encode("utf-8", "surrogatepass"), message, hashlib.sha256).hexdigest()


def canonical_domain(domain: str) -> str:
    """A mail domain as one spelling: trimmed of whitespace and trailing dots,
    IDNA-encoded (``"bücher.example."`` -> ``"xn--bcher-kva.example"``; the text as
    given when it is not a valid IDNA name), and ``googlemail.com`` (one mailbox with
    ``gmail.com``) as ``gmail.com``. Expects text already NFKC-normalised and
    lower-cased."""
    domain = _trim(domain)
    if domain.isascii():   # the codec would return it unchanged (or fail): skip it
        return _DOMAIN_ALIASES.get(domain, domain)
    # not IDNA (an empty or over-long label): kept as text, as the fallback spelling
    with contextlib.suppress(UnicodeError):
        # the idna codec also splits at the ideographic and full-width full stops
        domain = _trim(domain.encode("idna").decode("ascii").lower())
    return _DOMAIN_ALIASES.get(domain, domain)


def _trim(domain: str) -> str:
    """``domain`` without surrounding whitespace and trailing dots (a fully qualified
    ``gmail.com.`` is ``gmail.com``)."""
    domain = domain.strip()
    while domain.endswith("."):
        domain = domain[:-1].rstrip()
    return domain


def canonical_email(value: str, domains: Iterable[str]) -> str:
    """One spelling per mailbox: ``value`` NFKC-normalised, lower-cased and trimmed, its
    domain per ``canonical_domain``; for a domain in ``domains`` (which ignore them, as
    gmail.com does; compared in canonical form, so ``googlemail.com`` is ``gmail.com``)
    dots and a ``+tag`` are removed from the local part:
    ``" J.Doe+x@GoogleMail.com. "`` -> ``"jdoe@gmail.com"``. Idempotent. "" when there
    is nothing left; text without ``@`` is returned normalised."""
    # NFKC again after lower(): lower-casing can leave text that NFKC still changes
    text = _nfkc(_nfkc(value).lower()).strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    domain = canonical_domain(domain)
    if domain in {canonical_domain(_nfkc(d).lower().strip()) for d in domains}:
        local = local.split("+", 1)[0].replace(".", "")
    return f"{local}@{domain}" if local and domain else ""


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def canonical_phone(value: str) -> str:
    """The digits of a phone number, with a leading ``+`` kept: ``"+1 (555) 010-9999"``
    -> ``"+15550109999"``; "" without digits."""
    digits = "".join(c for c in value if c.isascii() and c.isdigit())
    if not digits:
        return ""
    return ("+" if value.strip().startswith("+") else "") + digits


def canonical_attribute(name: str, value: str, domains: Iterable[str]) -> str:
    if name == "email" or name.endswith("_email"):
        return canonical_email(value, domains)
    if name == "phone" or name.endswith("_phone"):
        return canonical_phone(value)
    return value.strip()


def parse_ip(text: str) -> IPAddress | None:
    """An address, IPv4-mapped IPv6 as IPv4; None when ``text`` is not one."""
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_network(address: IPAddress, spec: SignalSpec) -> str:
    """The network of ``address`` under the signal's prefix lengths, in CIDR form
    (``203.0.113.0/24``, ``2001:db8:1:2::/64``)."""
    width = address.max_prefixlen
    bits = spec.prefix if width == 32 else spec.prefix6
    mask = ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)
    return f"{type(address)(int(address) & mask)}/{bits}"


def header(headers: Mapping[str, str], name: str) -> str:
    """A header's value, trimmed, found whatever the case of its name ("" if absent)."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if isinstance(value, str) else ""


def observe(settings: LinkageSettings, account: Account, client_ip: str,
            headers: Mapping[str, str], *, peer_trusted: bool = True) -> list[Evidence]:
    """The evidence of one request: ``org``, then one digest per configured attribute,
    IP and header signal whose value is present (pair signals give none here). A
    header signal marked ``edge`` (set by the edge: a TLS fingerprint) is read only
    when ``peer_trusted`` (the request came through a trusted proxy): a client could
    otherwise copy a victim's value and link itself to them."""
    secret = settings.secret
    out = [Evidence(ORG, digest(secret, ORG, account.org))] if account.org else []
    attributes = dict(account.attributes)
    address = parse_ip(client_ip) if client_ip else None
    for spec in settings.signals:
        if spec.kind == "attribute":
            value = canonical_attribute(spec.name, attributes.get(spec.name, ""),
                                        settings.email_canonical_domains)
        elif spec.kind == "ip":
            value = ip_network(address, spec) if address is not None else ""
        elif spec.kind == "header":
            value = header(headers, spec.name) if peer_trusted or not spec.edge else ""
        else:
            continue
        if value:
            out.append(Evidence(spec.id, digest(secret, spec.id, value)))
    return out
