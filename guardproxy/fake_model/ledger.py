"""The executed ledger: what the fake model actually did for each request, so a test can
hold a proxy's charge against it (``GET /_fake/executed``, ``DELETE`` to clear)."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

LEDGER_SIZE = 10_000


@dataclass(slots=True)
class Executed:
    """One request to a model endpoint, updated while its answer is generated.

    ``status`` is the answer's status (0 while undecided). ``completions`` sequences were
    generated (best_of included), ``completion_tokens`` in all (one per word, counted as
    generated, so a cut or abandoned stream shows what was really produced);
    ``prompt_tokens`` counted as the usage reports them, 0 when nothing ran.
    ``usage_sent``: the answer carried usage covering all of it (cut or abandoned
    streams, ``no-usage`` and ``audio`` do not). ``cancelled``: ``"before"`` (the client
    left while ``slow-headers`` held the answer; nothing ran) or ``"during"`` (left
    mid-stream). ``reset``: ``reset-after`` cut the stream. ``finished``: no more will
    change."""

    request_id: str
    path: str
    status: int = 0
    stream: bool = False
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_sent: bool = False
    cancelled: str | None = None
    reset: bool = False
    finished: bool = False


class Ledger:
    """The last ``LEDGER_SIZE`` requests, oldest first."""

    def __init__(self, size: int = LEDGER_SIZE) -> None:
        self.entries: deque[Executed] = deque(maxlen=size)
        self.counter = itertools.count(1)

    def open(self, request_id: str | None, path: str) -> Executed:
        """A new record; ``request_id`` is the client's ``x-request-id`` when given."""
        record = Executed(request_id=request_id or f"fake-{next(self.counter)}", path=path)
        self.entries.append(record)
        return record

    def dump(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    def clear(self) -> int:
        count = len(self.entries)
        self.entries.clear()
        return count
