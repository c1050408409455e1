"""The interface every response stage implements.

A guard that needs to see the response (a budget settling real usage, a canary
rewriting text) returns a ``ResponseStage`` in its ``Outcome``. The middleware feeds
each stage the response as it passes and always calls ``finish`` exactly once:
after the last byte, on upstream failure, on client disconnect, or when a later
guard denied the request before it was forwarded.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class Ending(Enum):
    COMPLETED = "completed"      # the whole response reached the client
    DENIED = "denied"            # a later guard refused the request; nothing was forwarded
    UPSTREAM_FAILED = "upstream_failed"
    DISCONNECTED = "disconnected"


class ResponseStage(Protocol):
    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Called with the upstream status and headers before they are sent."""
        ...

    def chunk(self, data: bytes, final: bool) -> bytes:
        """See (and possibly rewrite) one body chunk; return what the client gets.
        ``final`` marks the last chunk: anything held back must be returned then."""
        ...

    async def finish(self, ending: Ending) -> None:
        """Settle whatever the stage holds; called exactly once."""
        ...
