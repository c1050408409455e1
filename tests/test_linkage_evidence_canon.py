"""E-mail canonicalisation (``linkage.evidence.canonical_email``): one spelling per
mailbox, so that a hydra cannot escape the e-mail link by re-spelling one address, and
distinct mailboxes never share a spelling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.linkage.evidence import canonical_domain, canonical_email, digest, observe
from guardproxy.linkage.settings import DEFAULT_DOMAINS, LinkageSettings, SignalSpec
from guardproxy.policy.model import Account

SECRET = "canon-test-secret-0123456789"
ASCII_LOCAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)


def canon(address: str) -> str:
    return canonical_email(address, DEFAULT_DOMAINS)


def full_width(text: str) -> str:
    """``text`` in the full-width forms of its printable ASCII (NFKC maps them back)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@given(st.text(max_size=40))
def test_canonicalisation_is_idempotent_on_any_text(text: str) -> None:
    once = canon(text)
    assert canon(once) == once


@given(st.lists(ASCII_LOCAL, min_size=1, max_size=4), st.sampled_from(
    ["gmail.com", "googlemail.com", "example.com", "bücher.example", "xn--bcher-kva.example"]))
def test_canonicalisation_is_idempotent_on_addresses(parts: list[str], domain: str) -> None:
    once = canon(".".join(parts) + "+tag@" + domain)
    assert once and canon(once) == once


@given(st.lists(ASCII_LOCAL, min_size=1, max_size=4), ASCII_LOCAL,
       st.sampled_from(["gmail.com", "googlemail.com"]),
       st.sampled_from(["gmail.com", "googlemail.com"]),
       st.booleans(), st.booleans(), st.booleans())
def test_gmail_spellings_of_one_mailbox_collide(
        parts: list[str], tag: str, domain: str, other: str, upper: bool,
        trailing_dot: bool, wide: bool) -> None:
    plain = f"{''.join(parts)}@gmail.com"
    variant = ".".join(parts) + f"+{tag}@{other}"
    if upper:
        variant = variant.upper()
    if trailing_dot:
        variant += "."
    if wide:
        variant = full_width(variant)
    assert canon(f"  {variant}\t") == canon(plain) == plain
    assert canon(f"{''.join(parts)}@{domain}") == plain


@pytest.mark.parametrize("variant", [
    "jdoe@googlemail.com", "j.doe@googlemail.com", "jdoe@gmail.com.", "J.Doe@GMAIL.COM.",
    " jdoe+news@gmail.com ", "jdoe@gmail\u3002com", full_width("jdoe@gmail.com"),
    "jdoe@GoogleMail.com..",
])
def test_the_attack_spellings_share_one_digest(variant: str) -> None:
    settings = LinkageSettings(secret=SECRET, signals=(
        SignalSpec(id="attribute:email", kind="attribute", weight=1.0, name="email"),))

    def email_digest(address: str) -> str:
        account = Account(id="x", org="", tier="free", attributes=(("email", address),))
        [evidence] = observe(settings, account, "", {})
        return evidence.digest

    assert email_digest(variant) == email_digest("jdoe@gmail.com") == \
        digest(SECRET, "attribute:email", "jdoe@gmail.com")


@given(ASCII_LOCAL, ASCII_LOCAL, st.sampled_from(["example.com", "corp.example", "bücher.de"]))
def test_dots_and_tags_matter_on_other_domains(a: str, b: str, domain: str) -> None:
    # example.com may deliver j.doe and jdoe to two people: never merge them
    assert canon(f"{a}.{b}@{domain}") != canon(f"{a}{b}@{domain}")
    assert canon(f"{a}+{b}@{domain}") != canon(f"{a}@{domain}")


@given(ASCII_LOCAL, ASCII_LOCAL)
def test_distinct_gmail_mailboxes_stay_distinct(a: str, b: str) -> None:
    assert (canon(f"{a}@googlemail.com") == canon(f"{b}@gmail.com")) == (a == b)


def test_configured_domains_are_compared_in_canonical_form() -> None:
    # configuring either Gmail domain covers both; a domain given in Unicode covers its
    # IDNA spelling
    assert canonical_email("j.doe@googlemail.com", {"gmail.com"}) == "jdoe@gmail.com"
    assert canonical_email("j.doe@gmail.com", {"googlemail.com"}) == "jdoe@gmail.com"
    assert canonical_email("j.doe@xn--bcher-kva.example", {"Bücher.Example"}) == \
        "jdoe@xn--bcher-kva.example"


@pytest.mark.parametrize(("raw", "canonical"), [
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("GoogleMail.com", "gmail.com"),
    ("gmail.com . ", "gmail.com"),
    ("ü" * 70 + ".de", "ü" * 70 + ".de"),     # not IDNA (label over 63): kept as text
    ("a..b", "a..b"),
])
def test_canonical_domain(raw: str, canonical: str) -> None:
    assert canonical_domain(raw.lower()) == canonical


def test_nothing_left_gives_no_evidence() -> None:
    assert canon("+tag@gmail.com") == "" and canon("jdoe@.") == "" and canon("  ") == ""
