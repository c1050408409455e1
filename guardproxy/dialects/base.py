"""A dialect is everything that differs between the OpenAI and Anthropic wire formats:
where the API key travels, what an error looks like, and how rate limits are reported.
Response-side knowledge (usage, text deltas) is added by later stages through the same
object, so the proxy core never branches on the dialect's name.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from guardproxy.guards.base import RateHeaders

if TYPE_CHECKING:
    from guardproxy.exchange import Exchange
    from guardproxy.response.usage import Tally

# Never forwarded upstream, whatever the dialect: the client's own credentials.
CLIENT_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "proxy-authorization", "x-goog-api-key"}
)

Headers = list[tuple[bytes, bytes]]


class Dialect(ABC):
    name: str

    @abstractmethod
    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The client's API key, as this dialect's clients send it."""

    @abstractmethod
    def error_body(self, status: int, kind: str, code: str, message: str) -> dict[str, object]:
        """The dialect's own error JSON for an HTTP status and a neutral error kind."""

    @abstractmethod
    def rate_headers(self, rates: Iterable[RateHeaders], now: float) -> Headers:
        """Response headers that report rate limits, as this dialect's SDKs read them."""

    # -- tokens: what a request may generate, what a response cost ------------------
    @abstractmethod
    def completion_field(self, path: str, body: Mapping[str, Any]) -> str | None:
        """The body field capping generated tokens on a generation endpoint, else None."""

    def completions_per_request(self, path: str, body: Mapping[str, Any]) -> int:
        """How many completions of up to the cap one request may generate (OpenAI's
        ``n`` and ``best_of``); each is billed, so each must be reserved."""
        return 1

    def ensure_stream_usage(self, exchange: Exchange) -> bool:
        """Make a streamed request report usage; True if the proxy had to ask for it
        (and must then hide the extra usage event from the client)."""
        return False

    @abstractmethod
    def read_json(self, body: Mapping[str, Any], tally: Tally) -> None:
        """Read usage from a whole JSON response."""

    @abstractmethod
    def read_event(self, name: str, data: Mapping[str, Any], tally: Tally) -> bool:
        """Read usage and text from one stream event; True if the event carries only
        usage (so that it can be hidden when the client did not ask for it)."""

    def error_response(self, status: int, kind: str, code: str, message: str,
                       retry_after: float = 0.0,
                       rates: Iterable[RateHeaders] = ()) -> tuple[Headers, bytes]:
        body = json.dumps(self.error_body(status, kind, code, message)).encode()
        headers: Headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if retry_after > 0:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        headers.extend(self.rate_headers(rates, time.time()))
        return headers, body
