"""The audit trail as an observer: ``completed(record)`` -> one JSON line.

Placeholder wiring (the full writer, rotation and chain land in this package):
``audit_observer(policy, state)`` returns the policy's trail, kept in the state so a
reload that leaves ``audit:`` as it was keeps the same file and writer.
"""

from __future__ import annotations

from typing import Any

from guardproxy.policy.model import Policy
from guardproxy.state import State


def audit_observer(policy: Policy, state: State) -> Any | None:
    """The observer writing ``policy.audit``'s trail, or None without ``audit:``."""
    return None
