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
    from guardproxy.policy.model import UpstreamConfig
    from guardproxy.request.plan import RequestPlan
    from guardproxy.response.chat_chunk import ChatChunk
    from guardproxy.response.usage import Tally

# Never forwarded upstream, whatever the dialect: the client's own credentials.
CLIENT_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "proxy-authorization", "x-goog-api-key"}
)

Headers = list[tuple[bytes, bytes]]


class Dialect(ABC):
    name: str
    # (path suffix, endpoint name) of the endpoints that generate text, checked in order
    endpoints: tuple[tuple[str, str], ...] = ()

    def endpoint(self, path: str) -> str | None:
        """The generation endpoint a normalised path names, or None."""
        return next((name for suffix, name in self.endpoints if path.endswith(suffix)), None)

    @abstractmethod
    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The client's API key, as this dialect's clients send it."""

    @abstractmethod
    def error_body(self, status: int, kind: str, code: str, message: str) -> dict[str, object]:
        """The dialect's own error JSON for an HTTP status and a neutral error kind."""

    @abstractmethod
    def rate_headers(self, rates: Iterable[RateHeaders], now: float) -> Headers:
        """Response headers that report rate limits, as this dialect's SDKs read them."""

    # -- the request: what it asks the model to do ------------------------------
    @abstractmethod
    def plan(self, path: str, body: Mapping[str, Any], upstream: UpstreamConfig) -> RequestPlan:
        """The request plan of a parsed JSON body on ``path``; raises ``RequestError``
        (400) naming a field whose type or value a lenient upstream could read
        differently."""

    def inject_stream_usage(self, body: dict[str, Any]) -> None:
        """Ask a streamed request to report usage (only called when the plan says so)."""
        return None

    @abstractmethod
    def read_json(self, body: Mapping[str, Any], tally: Tally) -> None:
        """Read usage from a whole JSON response."""

    @abstractmethod
    def read_event(self, name: str, data: Mapping[str, Any], tally: Tally) -> bool:
        """Read usage and text from one stream event; True if the event carries only
        usage (so that it can be hidden when the client did not ask for it)."""

    def read_chunk(self, chunk: ChatChunk, tally: Tally) -> bool | None:
        """``read_event`` of an event read as a chat chunk (``response.chat_chunk``),
        without its parse; None when this dialect cannot (then ``read_event`` is)."""
        return None

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

    def merge_rate_headers(self, upstream: Headers, ours: Headers) -> Headers:
        """One value per rate-limit header: where the upstream reports the same limit
        (its own ``x-ratelimit-*``), the tighter of the two sets is kept, whole — its
        limit, remaining and reset together. ``ours`` comes in (limit, remaining, reset)
        triples, as ``rate_headers`` renders them."""
        if not ours:
            return upstream
        theirs = {name.lower(): value for name, value in upstream}
        drop: set[bytes] = set()
        kept: Headers = []
        for i in range(0, len(ours), 3):
            triple = ours[i:i + 3]
            names = {name for name, _ in triple}
            remaining = theirs.get(triple[1][0])
            # ours win when tighter, and over a partial set (a limit with no remaining)
            if remaining is None or _tighter(triple[1][1], remaining):
                drop |= names
                kept += triple
        return [(n, v) for n, v in upstream if n.lower() not in drop] + kept


def _tighter(ours: bytes, theirs: bytes) -> bool:
    """Whether our remaining count is below the upstream's (an unreadable one loses)."""
    try:
        return int(ours) < int(theirs.strip())
    except ValueError:
        return True
