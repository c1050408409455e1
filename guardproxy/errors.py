"""The exception tree of guardproxy, documented in one place.

Lower-layer errors (httpx, redis, yaml, limits) are translated into these at the
boundary where they occur, so callers only ever catch ``GuardProxyError``.

    GuardProxyError
    ├── PolicyError            a policy or accounts file is invalid (carries every problem)
    ├── RequestError           the client's request is malformed            → 400 / 413
    ├── AuthenticationError    missing or unknown API key                   → 401
    ├── StoreError             the state store (Redis) failed               → 503
    └── UpstreamError          the model API failed before the response started → 502
        ├── UpstreamTimeout    it did not answer in time                     → 504
        └── UpstreamInterrupted  it failed after the response had started     (nothing
                               can be sent any more: the ending is "truncated")

``UpstreamApp`` (guardproxy.upstream) raises ``UpstreamError`` or ``UpstreamTimeout`` only
before it sent ``http.response.start``, ``UpstreamInterrupted`` only after, and
``RequestError`` (400) for a request target it refuses to forward. Their messages are
generic ("upstream unreachable"): they never name the upstream's address or credentials.

Each HTTP-facing error has ``status`` and ``kind`` (a dialect-neutral error kind the
dialects map to their own error JSON).
"""

from __future__ import annotations

from dataclasses import dataclass


class GuardProxyError(Exception):
    status: int = 500
    kind: str = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Problem:
    """One problem in a policy file, located by file, line and field path."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path or '<root>'}: {self.message}"


class PolicyError(GuardProxyError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RequestError(GuardProxyError):
    status = 400
    kind = "invalid_request"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(GuardProxyError):
    status = 401
    kind = "authentication"


class StoreError(GuardProxyError):
    status = 503
    kind = "unavailable"


class UpstreamError(GuardProxyError):
    status = 502
    kind = "upstream"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class UpstreamInterrupted(UpstreamError):
    """The upstream broke off (reset, closed, timed out, sent garbage) after the response
    to the client had started: the client's response is truncated, no error can be sent."""
