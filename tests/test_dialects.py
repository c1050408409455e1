from __future__ import annotations

import json

from guardproxy.dialects import get_dialect
from guardproxy.guards import RateHeaders


def test_openai_error_and_headers() -> None:
    d = get_dialect("openai")
    rate = RateHeaders("requests", 20, 0, 1000.0 + 65)
    headers, body = d.error_response(429, "rate_limit", "rate_limit_exceeded", "slow down",
                                     retry_after=2.2, rates=[rate])
    err = json.loads(body)["error"]
    assert err["code"] == "rate_limit_exceeded" and err["message"] == "slow down"
    h = dict(headers)
    assert h[b"retry-after"] == b"3"
    assert h[b"x-ratelimit-limit-requests"] == b"20"
    assert h[b"x-ratelimit-remaining-requests"] == b"0"
    assert d.rate_headers([RateHeaders("tokens", 5, 4, 1065.0)], 1000.0)[2] == (
        b"x-ratelimit-reset-tokens", b"1m5s")


def test_anthropic_error_and_headers() -> None:
    d = get_dialect("anthropic")
    _, body = d.error_response(429, "rate_limit", "rate_limit_exceeded", "slow down")
    assert json.loads(body) == {"type": "error",
                                "error": {"type": "rate_limit_error", "message": "slow down"}}
    h = dict(d.rate_headers([RateHeaders("requests", 10, 3, 0.0)], 0.0))
    assert h[b"anthropic-ratelimit-requests-remaining"] == b"3"
    assert h[b"anthropic-ratelimit-requests-reset"] == b"1970-01-01T00:00:00Z"
    _, auth = d.error_response(401, "authentication", "", "bad key")
    assert json.loads(auth)["error"]["type"] == "authentication_error"


def test_api_key_locations() -> None:
    assert get_dialect("openai").api_key({"authorization": "Bearer k"}) == "k"
    assert get_dialect("openai").api_key({"authorization": "Basic k"}) is None
    assert get_dialect("anthropic").api_key({"x-api-key": "k"}) == "k"
