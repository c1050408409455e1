"""Admission as one batch: what a request's guards ask of the store, sent together.

Guards that count in the shared store do not call it one by one: each declares what it
needs (``QuotaAsk``, ``BudgetAsk``, ``GateAsk``), the flow adds the linkage record
(``RecordAsk``) and sends them all in one call, ``AdmissionStore.admit``, then each guard
decides from its ``Result``. On Redis that call is one atomic script (on Redis Cluster
one per hash slot, concurrently: ``admission_redis.py``); on ``memory://`` it runs on
the event loop without awaiting between asks (``admission_memory.py``). Both follow
the same rules, tested against each other and, for quota windows, against ``limits``:

- asks are judged in the order given (the pipeline's: phase, then file order);
- the first enforced (non-shadow) denial stops the batch: the budgets reserved before
  it are released and no quota counts the request (later asks are not judged: their
  result's ``status`` is ``SKIPPED``);
- otherwise every quota ask that allowed the request counts it in each of its windows
  (shadow rules too), and every budget ask that allowed it holds a lease;
- ``per: cluster`` keys: a key is a ``Template``, parts to be joined by the request's
  cluster id (escaped as in ``guards/per.py``), known only once the record ran.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guardproxy.state.budgets import Window

if TYPE_CHECKING:
    from guardproxy.linkage.api import Cluster, Evidence, PairEvidence

Template = tuple[str, ...]
"""A key: its parts, joined by the request's escaped cluster id (one part: no cluster)."""

ALLOWED, DENIED, SKIPPED = 1, 0, -1


def render(template: Template, cluster_id: str) -> str:
    return template[0] if len(template) == 1 else escape(cluster_id).join(template)


def escape(value: str) -> str:
    """A key part from a client or an account: cannot forge another part (guards/per.py)."""
    if "%" in value or "|" in value or "\x00" in value:
        return value.replace("%", "%25").replace("|", "%7C").replace("\x00", "%00")
    return value


@dataclass(frozen=True, slots=True)
class QuotaAsk:
    """Count one request in every window of a quota rule, if all have room."""

    rule: str
    shadow: bool
    strategy: str                          # 'f' fixed, 'm' moving, 's' sliding window
    key: Template                          # the rule's per key
    windows: tuple[tuple[int, int], ...]   # (limit, seconds), shortest first or not


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """Reserve ``ceil(prompt_weight * prompt + completion_weight * cap * copies)`` tokens
    in every window of a budget subject. ``cap`` is the rule's own output cap; when an
    earlier budget ask of the batch allowed the request (enforced, generating) its cap
    (clamped or not) is used instead. ``clamp``: when the amount does not fit, lower
    the cap to what is left, never below ``min_tokens``."""

    rule: str
    shadow: bool
    subject: Template
    lease_id: str
    generates: bool
    prompt_weight: float
    prompt: int
    completion_weight: float
    copies: int
    cap: int
    clamp: bool
    min_tokens: int
    windows: tuple[Window, ...]
    ttl: float


@dataclass(frozen=True, slots=True)
class GateAsk:
    """Deny on the recorded cluster: more than ``max_accounts`` accounts, or
    (``blocked``) any of its accounts blocked. Without a record: allowed."""

    rule: str
    shadow: bool
    max_accounts: int | None
    blocked: bool


@dataclass(frozen=True, slots=True)
class RecordAsk:
    """Record a request's linkage evidence and read its cluster, before the asks.
    ``store`` is the enricher's ``LinkageStore``; a Redis one on the batch's client
    runs inside the batch."""

    store: Any
    account: str
    evidence: tuple[Evidence, ...]
    now: float
    pairs: tuple[PairEvidence, ...] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A rule that denied without the store (enforced): the asks before it are judged
    (the first denial in order wins), then the batch stops there."""

    rule: str
    shadow: bool = False


Ask = QuotaAsk | BudgetAsk | GateAsk | Refusal


@dataclass(slots=True)
class Result:
    """One ask's answer. Quota: ``denied`` is the index of the first full window (-1
    none); ``remaining`` and ``resets`` per window, once this request counted (as
    found when it did not: denied, or another rule denied it).
    Budget: ``amount`` reserved (or needed), final ``cap``, ``remaining`` per window
    after reserving (or as found), ``lease_id`` when a lease is held. Gate: status."""

    status: int
    denied: int = -1
    amount: int = 0
    cap: int = 0
    remaining: tuple[int, ...] = ()
    resets: tuple[float, ...] = ()
    lease_id: str | None = None

    @property
    def allowed(self) -> bool:
        return self.status == ALLOWED


NOT_JUDGED = Result(SKIPPED)


@dataclass(slots=True)
class Batch:
    """What ``admit`` returns: the store's clock, the recorded cluster (None without a
    record), one ``Result`` per ask, in order, and whether an enforced denial stopped
    the batch (then no lease is held: a budget result's ``lease_id`` is None)."""

    now: float
    cluster: Cluster | None
    results: list[Result]
    stopped: bool = False


def budget_amount(ask: BudgetAsk, cap: int) -> int:
    """Tokens to reserve with output ``cap`` (the float arithmetic admit.lua does)."""
    return math.ceil(ask.prompt_weight * ask.prompt + ask.completion_weight * (cap * ask.copies))


def clamped(ask: BudgetAsk, smallest: int, cap: int) -> int | None:
    """The lower cap that fits in ``smallest`` tokens left, or None (see ``BudgetAsk``)."""
    if not (ask.clamp and ask.generates and not ask.shadow and ask.completion_weight > 0):
        return None
    room = int((smallest - ask.prompt_weight * ask.prompt)
               / (ask.completion_weight * ask.copies))
    if ask.min_tokens <= room < cap and budget_amount(ask, room) <= smallest:
        return room
    return None


def judge_gate(ask: GateAsk, cluster: Cluster | None) -> Result:
    """A linkage rule on the recorded cluster (admit.lua judges it the same way)."""
    if cluster is None:
        return Result(ALLOWED)
    if ask.max_accounts is not None and cluster.size > ask.max_accounts:
        return Result(DENIED)
    if ask.blocked and cluster.linked_to_blocked:
        return Result(DENIED)
    return Result(ALLOWED)


class AdmissionStore(ABC):
    """Runs admission batches; opened with the state (``State.admission``)."""

    @abstractmethod
    async def admit(self, asks: Sequence[Ask], record: RecordAsk | None = None) -> Batch:
        """Judge ``asks`` as one batch (module docstring). Raises ``StoreError`` when the
        store fails. The call may have run all the same (its reply lost): the leases it
        may hold are then released later, by the settle retry queue; quota hits it may
        have counted stay (stricter, never looser)."""

    @abstractmethod
    async def quota_state(self, ask: QuotaAsk, cluster_id: str = "") -> Result:
        """The windows of a quota ask as they are (``denied``, ``remaining``, ``resets``);
        counts nothing. Raises ``StoreError``."""

    @abstractmethod
    async def carry_quota(self, ask: QuotaAsk, moves: Sequence[tuple[str, str]]) -> int:
        """For each ``(source key, target key)`` of the rule, add what the limiter counts
        for the source now to the target, once per merge and window (a marker); fixed
        and sliding windows only. Returns the hits added. Raises ``StoreError``."""

    async def aclose(self) -> None:
        return None
