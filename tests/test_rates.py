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
