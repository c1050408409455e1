"""Wire dialects, chosen by name in ``upstream.dialect``."""

from __future__ import annotations

from guardproxy.dialects.anthropic import AnthropicDialect
from guardproxy.dialects.base import CLIENT_CREDENTIAL_HEADERS, Dialect
from guardproxy.dialects.openai import OpenAIDialect

DIALECTS: dict[str, type[Dialect]] = {"openai": OpenAIDialect, "anthropic": AnthropicDialect}

__all__ = ["CLIENT_CREDENTIAL_HEADERS", "DIALECTS", "Dialect", "get_dialect"]


def get_dialect(name: str) -> Dialect:
    return DIALECTS[name]()
