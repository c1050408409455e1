"""Shared state, chosen by URI scheme as in the ``limits`` library.

    memory://                      one process (the embedded default)
    redis://host:port/db           one Redis;  rediss:// for TLS
    redis+cluster://h1:p1,h2:p2    Redis Cluster
    redis+sentinel://h:p/service   Redis Sentinel

A request's store work goes in one batch (``State.admission``, ``state/admission.py``):
quota windows (the ``limits`` strategies, reimplemented to run in that batch and tested
against ``limits`` itself), budget reservations and the linkage record. Budgets settle
through a ``BudgetStore`` (``state/budgets.py``) on the same keys. Settles that fail
while the store is down go through ``State.settles`` (``state/retry.py``), which queues
and retries them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from guardproxy.errors import StoreError
from guardproxy.state.admission import AdmissionStore
from guardproxy.state.admission_memory import MemoryAdmission
from guardproxy.state.admission_redis import RedisAdmission
from guardproxy.state.budgets import BudgetStore, MemoryBudgetStore
from guardproxy.state.budgets_redis import RedisBudgetStore
from guardproxy.state.redis_client import redis_from_uri
from guardproxy.state.retry import PendingSettle, SettleRetry

T = TypeVar("T")
SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+cluster", "redis+sentinel")


def scheme_of(uri: str) -> str:
    return uri.partition("://")[0].lower()


def validate_uri(uri: str) -> None:
    """Raise ValueError naming the problem; used by the policy loader."""
    if "://" not in uri:
        raise ValueError(f"not a state URI: {uri!r} (expected e.g. memory:// or redis://host:6379)")
    scheme = scheme_of(uri)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown state scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")


@dataclass
class State:
    uri: str
    key_prefix: str
    admission: AdmissionStore
    budgets: BudgetStore
    redis: Any = None       # the redis-py asyncio client, when the state is Redis
    settles: SettleRetry = field(default_factory=SettleRetry)  # failed settles, retried
    # stores opened by rule kinds (canary ledgers), kept across reloads: a rebuilt
    # pipeline gets the same object back, so a memory:// ledger is never reset
    extras: dict[Hashable, Any] = field(default_factory=dict)

    def extra(self, key: Hashable, open_: Callable[[], T]) -> T:
        """The store kept under ``key``, opened by ``open_()`` the first time."""
        if key not in self.extras:
            self.extras[key] = open_()
        found: T = self.extras[key]
        return found

    @property
    def shared(self) -> bool:
        """Whether several processes see the same counters."""
        return scheme_of(self.uri) != "memory"

    async def aclose(self) -> None:
        await self.settles.aclose()  # its last attempts need the budget store still open
        await self.budgets.aclose()
        await self.admission.aclose()   # the Redis client closes with the budget store


def open_state(uri: str, key_prefix: str = "guardproxy") -> State:
    """Open the stores for a URI. Nothing connects yet: the first request does.
    Raises ValueError for a URI that names no store."""
    validate_uri(uri)
    if scheme_of(uri) == "memory":
        memory = MemoryBudgetStore()
        return State(uri=uri, key_prefix=key_prefix, admission=MemoryAdmission(memory),
                     budgets=memory)
    client = redis_from_uri(uri)
    budgets = RedisBudgetStore(client, key_prefix)
    settles = SettleRetry()

    def release(leases: list[tuple[str, str]], why: StoreError) -> None:
        settles.later([PendingSettle(budgets, subject, lease, 0) for subject, lease in leases],
                      why)

    return State(uri=uri, key_prefix=key_prefix,
                 admission=RedisAdmission(client, key_prefix, release=release),
                 budgets=budgets, redis=client, settles=settles)
