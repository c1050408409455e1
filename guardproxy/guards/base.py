"""What a rule kind is, and what its guards return.

A rule kind is a module in ``guardproxy.guards`` that defines ``KIND = RuleKind(...)``;
it is discovered at start-up (see ``guardproxy.guards.rule_kinds``), so a new kind is
a new module and nothing else. A kind parses its own YAML keys into a frozen settings
dataclass and builds a ``Guard`` from it. Guards run in ``Phase`` order (the order
itself lives in ``guardproxy.flow``), then in file order within a phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from guardproxy.dialects.base import Dialect
    from guardproxy.exchange import Exchange
    from guardproxy.observe import Observer
    from guardproxy.policy.model import Policy, Rule
    from guardproxy.policy.reader import Reader
    from guardproxy.response.events import ResponseStage
    from guardproxy.response.usage import Lease
    from guardproxy.state import State
    from guardproxy.state.admission import AdmissionStore, Ask, Batch, Result


class Phase(IntEnum):
    SHAPING = 10   # deny / clamp request parameters
    QUOTA = 20     # request-rate limits
    BUDGET = 30    # token budgets (reserve before, settle after)
    LINKAGE = 40   # linked-account actions
    RESPONSE = 90  # response-only rules (canaries)


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """One rate-limit window a guard reports; dialects render it to their headers."""

    resource: str          # "requests" | "tokens" | "input-tokens" | "output-tokens"
    limit: int
    remaining: int
    reset_at: float        # unix time


@dataclass(slots=True)
class Outcome:
    """A guard's answer for one request.

    A denial carries its HTTP ``status`` (429 for limits, 400/403 for shaping), a
    dialect-neutral error ``kind`` and ``code``, and the ``window`` that decided
    (``"20/minute"``)."""

    allowed: bool
    rule: str
    shadow: bool = False
    rate: tuple[RateHeaders, ...] = ()
    retry_after: float = 0.0
    status: int = 429
    kind: str = "rate_limit"            # dialect-neutral error kind when denied
    code: str = "rate_limit_exceeded"
    message: str = ""
    window: str = ""
    lease: Lease | None = None          # settled from the response's usage (budgets)
    stage: ResponseStage | None = None  # sees the response itself (canaries)

    @property
    def enforced_denial(self) -> bool:
        return not self.allowed and not self.shadow


class Guard(Protocol):
    rule: Rule

    async def check(self, exchange: Exchange) -> Outcome | None:
        """Decide on a request; ``None`` means the rule has nothing to say about it."""
        ...


@runtime_checkable
class BatchedGuard(Guard, Protocol):
    """A guard whose store work joins the request's admission batch (flow.Pipeline):
    ``plan`` says what it asks of the store (or decides at once: an ``Outcome``, or
    None for nothing to say), and ``decide`` reads its answer. Neither awaits."""

    def plan(self, exchange: Exchange) -> Ask | Outcome | None: ...

    def decide(self, exchange: Exchange, ask: Ask, result: Result,
               batch: Batch) -> Outcome | None:
        """The rule's verdict from its ``result`` (None when it was not judged)."""
        ...


async def alone(guard: BatchedGuard, store: AdmissionStore, exchange: Exchange) -> Outcome | None:
    """A batched guard's ``plan`` and ``decide`` as a batch of its own: its ``check``
    (tests, embedding without a flow; the flow batches all guards together)."""
    ask = guard.plan(exchange)
    if ask is None or isinstance(ask, Outcome):
        return ask
    batch = await store.admit([ask])
    return guard.decide(exchange, ask, batch.results[0], batch)


@dataclass(frozen=True)
class Runtime:
    """What a guard may use: built once per policy in the app lifespan and passed in."""

    policy: Policy
    state: State
    dialect: Dialect
    observer: Observer


@dataclass(frozen=True)
class RuleKind:
    key: str                                   # the YAML key that selects the kind
    phase: Phase
    parse: Callable[[Reader], Any]             # -> frozen settings dataclass
    build: Callable[[Rule, Runtime], Guard]
    fields: frozenset[str] = frozenset()       # further YAML keys the kind accepts
    uses_per: bool = True


PerKey = Callable[["Exchange"], "str | None"]
"""A ``per:`` key's value for a request; None when the request does not carry it (the
rule then counts that request under an empty value: it is never skipped)."""
