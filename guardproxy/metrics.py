"""Prometheus metrics (placeholder wiring; the observer and ``/metrics`` land here).

``metrics_observer(policy, state)`` returns the process's metrics observer (None:
metrics off)."""

from __future__ import annotations

from typing import Any

from guardproxy.policy.model import Policy
from guardproxy.state import State


def metrics_observer(policy: Policy, state: State) -> Any | None:
    return None
