"""The request plan: what one request asks the model to do, read once from its body.

Every guard and the forwarded body use the same plan, so no rule can read a request
differently from the upstream. The dialect builds it (``Dialect.plan``); fields whose
type a lenient server could read otherwise (``"n": "4"``, ``"max_tokens": 1e3``,
``"stream": "true"``) are refused with a 400 naming the field rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guardproxy.errors import RequestError


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """``endpoint``: "chat", "completions", "responses", "messages", or None for a path
    that generates no text. ``cap``: the client's output cap per completion (tokens),
    None when it named none. ``cap_fields``: every body field the proxy writes the cap
    it reserved for into (the upstream's own field and any the client used).
    ``completions``: completions one request generates (``max(n, best_of)`` per prompt).
    ``inject_usage``: whether the proxy adds ``stream_options.include_usage`` (and then
    hides the extra usage chunk). ``exact``: the answer must reach the client exactly
    as generated (structured output, log-probabilities). ``deferred``: the request makes
    the upstream generate later, out of the proxy's sight (a batch, a background
    response), so no budget can be settled from its response."""

    endpoint: str | None = None
    model: str | None = None
    stream: bool = False
    cap: int | None = None
    cap_fields: tuple[str, ...] = ()
    completions: int = 1
    inject_usage: bool = False
    exact: bool = False     # structured output or logprobs: never rewritten (canaries)
    deferred: bool = False  # generation the proxy never sees (batches, background runs)

    @property
    def generates(self) -> bool:
        return self.endpoint is not None


NOT_GENERATION = RequestPlan()
DEFERRED = RequestPlan(deferred=True)


def integer(body: Mapping[str, Any], field: str, *, minimum: int = 0,
            maximum: int = 2**31 - 1) -> int | None:
    """A JSON integer field, None when absent or null. Strings, floats and booleans are
    refused: pydantic's lax mode (vLLM, FastAPI apps) would read ``"4"`` or ``4.0`` as 4."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"'{field}' must be an integer, got {type(value).__name__}.")
    if not minimum <= value <= maximum:
        raise RequestError(f"'{field}' must be from {minimum} to {maximum}.")
    return value


def boolean(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{field}' must be a boolean, got {type(value).__name__}.")
    return value


def model_of(body: Mapping[str, Any], path: str) -> str:
    """The model: an Azure deployment named in the path (Azure ignores the body's
    ``model``), else the body's ``model`` string. Refused when absent: a rule per model or
    for a model must never be skipped."""
    parts = path.split("/")
    if "deployments" in parts[:-1]:
        deployment = parts[parts.index("deployments") + 1]
        if deployment:
            return deployment
    value = body.get("model")
    if isinstance(value, str) and value:
        return value
    if value is not None:
        raise RequestError("'model' must be a non-empty string.")
    raise RequestError("'model' is required.")


def cap_of(body: Mapping[str, Any], fields: tuple[str, ...]) -> tuple[int | None, tuple[str, ...]]:
    """The output cap among ``fields`` and the fields that carried it. Two fields with
    different values are refused: upstreams differ on which one wins."""
    given = {f: v for f in fields if (v := integer(body, f)) is not None}
    values = set(given.values())
    if len(values) > 1:
        raise RequestError(f"{' and '.join(repr(f) for f in given)} disagree; send one.")
    return (values.pop() if values else None), tuple(given)
