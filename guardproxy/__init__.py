"""guardproxy: an anti-distillation policy proxy for model APIs."""

from guardproxy.errors import (
    AuthenticationError,
    GuardProxyError,
    PolicyError,
    RequestError,
    StoreError,
    UpstreamError,
    UpstreamTimeout,
)
from guardproxy.middleware import GuardMiddleware

__all__ = [
    "AuthenticationError",
    "GuardMiddleware",
    "GuardProxyError",
    "PolicyError",
    "RequestError",
    "StoreError",
    "UpstreamError",
    "UpstreamTimeout",
]
