"""The policy's ``linkage:`` section: parsed as the issue shows it, every mistake named
with file:line, the secret never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.errors import PolicyError
from guardproxy.linkage.settings import ipv6_prefix_for, parse_window
from guardproxy.policy.load import load_policy
from tests.conftest import write_policy

SECRET = "a-linkage-secret-of-32-characters!"
ENV = {"GUARDPROXY_LINKAGE_SECRET": SECRET}

ISSUE_EXAMPLE = """
linkage:
  secret: ${GUARDPROXY_LINKAGE_SECRET}   # HMAC key: raw values are never stored or logged
  window: 30d                            # evidence older than this stops counting
  threshold: 1.0                         # accounts link when shared evidence reaches this
  signals:
    - {attribute: payment, weight: 1.0, max_fanout: 5}
    - {attribute: email, weight: 1.0}
    - {attribute: phone, weight: 1.0}
    - {ip: exact, weight: 0.5, max_fanout: 20}
    - {ip: /24, weight: 0.3, max_fanout: 20}     # IPv6: /64
    - {header: x-device-id, weight: 0.6, max_fanout: 5}
    - {header: x-ja4, weight: 0.3, max_fanout: 50}   # a TLS fingerprint set by the edge
    - {prompt_similarity: 0.8, weight: 0.25, min_pairs: 5}   # near-duplicate prompts
    - {co_activity: 60s, weight: 0.25, min_events: 5}        # same short bursts
rules:
  - name: q
    quota: 10/minute
"""


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, ENV)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, marker: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line)


def test_the_issue_example_parses(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, ISSUE_EXAMPLE), ENV)
    s = policy.linkage
    assert s is not None
    assert s.secret == SECRET
    assert s.window == 30 * 86400.0
    assert s.threshold == 1.0
    assert s.email_canonical_domains == {"gmail.com", "googlemail.com"}
    assert 0 < s.rebuild_every <= s.window
    ids = [x.id for x in s.signals]
    assert ids == ["attribute:payment", "attribute:email", "attribute:phone", "ip:exact",
                   "ip:/24", "header:x-device-id", "header:x-ja4", "prompt_similarity",
                   "co_activity"]
    by = {x.id: x for x in s.signals}
    assert by["attribute:payment"].max_fanout == 5 and by["attribute:payment"].weight == 1.0
    assert by["attribute:email"].max_fanout is None and by["attribute:email"].fanout > 5
    assert (by["ip:exact"].prefix, by["ip:exact"].prefix6) == (32, 128)
    assert (by["ip:/24"].prefix, by["ip:/24"].prefix6) == (24, 64)
    assert by["header:x-ja4"].name == "x-ja4" and by["header:x-ja4"].max_fanout == 50
    assert by["prompt_similarity"].similarity == 0.8 and by["prompt_similarity"].min_pairs == 5
    assert by["co_activity"].burst == 60.0 and by["co_activity"].min_events == 5
    assert by["co_activity"].pair and not by["ip:/24"].pair
    hash(s)   # the enricher keeps it in the state, keyed by the settings


def test_the_secret_is_never_shown(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, ISSUE_EXAMPLE), ENV)
    assert SECRET not in repr(policy.linkage)
    assert SECRET not in repr(policy)
    assert SECRET not in str(policy.linkage)


def test_a_policy_without_linkage_has_none(tmp_path: Path) -> None:
    assert load_policy(write_policy(tmp_path, "rules: []\n"), ENV).linkage is None


def test_options_the_issue_leaves_open(tmp_path: Path) -> None:
    path = write_policy(tmp_path, """
linkage:
  secret: 0123456789abcdef
  window: 2w
  threshold: 1.5
  rebuild_every: 0
  email_canonical_domains: [Example.COM, "@proton.me"]
  signals:
    - {ip: /20, ipv6: /56, weight: 0.3}
    - {ip: /16, weight: 0.1}
    - {header: X-Device-ID, weight: 0.6}
    - {co_activity: 2m, weight: 0.25, min_share: 0.8, max_fanout: 10}
""")
    s = load_policy(path, ENV).linkage
    assert s is not None
    assert s.window == 14 * 86400.0 and s.threshold == 1.5 and s.rebuild_every == 0.0
    assert s.email_canonical_domains == {"example.com", "proton.me"}
    v6, wide, device, co = s.signals
    assert (v6.id, v6.prefix, v6.prefix6) == ("ip:/20,v6/56", 20, 56)
    assert (wide.id, wide.prefix6) == ("ip:/16", 48)
    assert device.id == "header:x-device-id"
    assert (co.burst, co.min_share, co.fanout) == (120.0, 0.8, 10)


def test_every_mistake_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = write_policy(tmp_path, """
linkage:
  secret: short
  window: 400d
  threshold: heavy
  colour: blue
  signals:
    - {attribute: payment, weight: 1.0, max_fanout: 0}
    - {ip: /40, weight: 0.3}
    - {header: "bad header", weight: 0.6}
    - {prompt_similarity: 1.5, weight: 0.25}
    - {co_activity: soon, weight: 0.25}
    - {attribute: email, ip: exact, weight: 1.0}
    - {weight: 1.0}
    - {attribute: phone}
    - {attribute: card, weight: "-1"}
    - {attribute: payment, weight: 0.5}
    - {header: x-ja4, weight: 0.3, min_pairs: 3}
    - just-a-string
    - {co_activity: null, weight: 0.2}
""")
    lines = problems_of(path)
    f = str(path)

    def has(marker: str, field: str, message: str) -> None:
        expected = f"{f}:{line_of(path, marker)}: {field}: {message}"
        assert any(x.startswith(expected) for x in lines), (expected, lines)

    has("secret: short", "linkage.secret", "must be at least 16 characters")
    has("window: 400d", "linkage.window", "must be at most 365d")
    has("threshold: heavy", "linkage.threshold", "must be a number")
    has("colour: blue", "linkage.colour", "unknown key")
    has("max_fanout: 0", "linkage.signals[0].max_fanout", "must be an integer from 1")
    has("ip: /40", "linkage.signals[1].ip", "must be 'exact' or a network length /1 to /32")
    has("bad header", "linkage.signals[2].header", "not a valid HTTP header name")
    has("prompt_similarity: 1.5", "linkage.signals[3].prompt_similarity",
        "must be a similarity in (0, 1]")
    has("co_activity: soon", "linkage.signals[4].co_activity", "invalid duration")
    has("attribute: email, ip", "linkage.signals[5]", "a signal has one kind; found attribute, ip")
    has("{weight: 1.0}", "linkage.signals[6]", "a signal needs exactly one of")
    has("{attribute: phone}", "linkage.signals[7]", "missing required key 'weight'")
    has('weight: "-1"', "linkage.signals[8].weight", "must be")
    has("attribute: payment, weight: 0.5", "linkage.signals[9].attribute",
        "duplicate signal 'attribute:payment' (first at line")
    has("min_pairs: 3", "linkage.signals[10].min_pairs", "unknown key")
    has("just-a-string", "linkage.signals[11]", "must be a mapping")
    has("co_activity: null", "linkage.signals[12].co_activity", "no value")


def test_missing_and_empty_sections(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "linkage:\n  window: 1d\n")
    lines = problems_of(path)
    assert any(f"{path}:8: linkage: missing required key 'secret'" in x for x in lines)
    assert any(f"{path}:8: linkage: missing required key 'signals'" in x for x in lines)
    empty = write_policy(tmp_path, "linkage:\n")
    assert any(f"{empty}:7: linkage: empty" in x for x in problems_of(empty))
    no_signals = write_policy(tmp_path, "linkage: {secret: 0123456789abcdef, signals: []}\n")
    assert any("linkage.signals: no signals" in x for x in problems_of(no_signals))
    not_a_map = write_policy(tmp_path, "linkage: [1, 2]\n")
    assert any(f"{not_a_map}:7: linkage: must be a mapping" in x
               for x in problems_of(not_a_map))


def test_an_unset_secret_variable_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = write_policy(tmp_path, ISSUE_EXAMPLE)
    with pytest.raises(PolicyError) as info:
        load_policy(path, {})
    assert any("GUARDPROXY_LINKAGE_SECRET" in str(p) for p in info.value.problems)


def test_rebuild_longer_than_the_window_is_refused(tmp_path: Path) -> None:
    path = write_policy(tmp_path, """
linkage:
  secret: 0123456789abcdef
  window: 1h
  rebuild_every: 2h
  signals: [{ip: exact, weight: 1}]
""")
    assert any(f"{path}:{line_of(path, 'rebuild_every')}: linkage.rebuild_every: must not be "
               "longer than the window" in x for x in problems_of(path))


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400.0), ("2w", 14 * 86400.0), ("12h", 43200.0), ("90m", 5400.0),
    ("60s", 60.0), ("250ms", 0.25), (45, 45.0), ("1.5d", 1.5 * 86400.0)])
def test_windows(text: str | int, seconds: float) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["0d", "-1d", "366d", "1y", True, "", "nan"])
def test_bad_windows(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_window(text)


def test_the_ipv6_mapping_is_documented_and_monotone() -> None:
    assert [ipv6_prefix_for(p) for p in (32, 31, 24, 23, 16, 15, 8)] == \
        [128, 64, 64, 48, 48, 32, 32]


# -- whatever the section holds: settings or file:line problems, never a crash ------
LINKAGE_KEYS = ["secret", "window", "threshold", "signals", "email_canonical_domains",
                "rebuild_every", "attribute", "ip", "header", "prompt_similarity",
                "co_activity", "weight", "max_fanout", "min_pairs", "min_events",
                "min_share", "ipv6", "colour"]
SCALARS = st.one_of(
    st.sampled_from(["0123456789abcdef", "short", "30d", "0", "-1", "1.5", "nan", "inf",
                     "exact", "/24", "/0", "/129", "x-ja4", "bad header", "60s", "1e309",
                     "payment", "", "[", "::1", "0.8", True, None]),
    st.integers(-10, 2000), st.floats(allow_nan=True, allow_infinity=True))
STRUCT = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(LINKAGE_KEYS), inner, max_size=5)), max_leaves=12)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(LINKAGE_KEYS), STRUCT, max_size=6))
def test_any_linkage_section_loads_or_names_its_problems(tmp_path: Path,
                                                         section: dict[str, Any]) -> None:
    path = write_policy(tmp_path, yaml.safe_dump({"linkage": section, "rules": []}))
    try:
        policy = load_policy(path, ENV)
    except PolicyError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line >= 1 and "\n" not in problem.message
        return
    s = policy.linkage
    if s is not None:
        assert len(s.secret) >= 16 and s.signals and s.threshold > 0 and s.window > 0
        assert all(x.weight > 0 and x.fanout >= 1 for x in s.signals)
        assert len({x.id for x in s.signals}) == len(s.signals)


def test_a_cluster_rule_without_a_linkage_section_is_an_error(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nupstream: {url: 'http://127.0.0.1:9'}\nrules:\n"
        "  - name: hydra\n    budget: 1000/day\n    per: cluster\n"
        "  - name: size\n    linkage: {max_accounts: 5}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(policy)
    text = str(err.value)
    assert f"{policy}:4" in text and f"{policy}:7" in text and "linkage:" in text


def test_an_unset_secret_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(write_policy(tmp_path, ISSUE_EXAMPLE), {})
    assert [p.message for p in info.value.problems if p.path == "linkage.secret"] == [
        "environment variable GUARDPROXY_LINKAGE_SECRET is not set "
        "(write ${GUARDPROXY_LINKAGE_SECRET:-default} to give a default)"]
