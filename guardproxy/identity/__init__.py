"""Identity: who is calling (account, org, tier) and from where (client IP)."""

from __future__ import annotations

from guardproxy.identity.resolve import Identifier

__all__ = ["Identifier"]
