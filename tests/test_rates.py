"""Rates the stores cannot hold exactly are refused when the policy loads."""

from __future__ import annotations

import pytest

from guardproxy.guards.rates import parse_rates


@pytest.mark.parametrize("rate", ["99999999999999999999999/minute", "5/1000000000 years",
                                  "0/minute", "", "often"])
def test_out_of_range_rates_are_refused(rate: str) -> None:
    with pytest.raises(ValueError):
        parse_rates(rate)


def test_ordinary_rates_parse() -> None:
    assert [int(i.get_expiry()) for i in parse_rates("20/minute; 5/year")] == [60, 360 * 86400]


def test_a_counter_key_names_the_window_not_the_limit() -> None:
    # a reload from 3/minute to 4/minute keeps counting in the same window
    from guardproxy.guards.rates import parse_rates

    (three,), (four,) = parse_rates("3/minute"), parse_rates("4/minute")
    assert three.key_for("rule", "alice") == four.key_for("rule", "alice")
    assert three.key_for("rule", "alice") != parse_rates("3/hour")[0].key_for("rule", "alice")
    assert (three.amount, four.amount, three.get_expiry()) == (3, 4, 60)


def test_a_window_given_twice_is_refused() -> None:
    from guardproxy.guards.rates import parse_rates

    with pytest.raises(ValueError, match="twice"):
        parse_rates("3/minute; 5 per 1 minute")
