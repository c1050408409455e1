"""Cluster decisions as events: what every linkage store reports through ``on_event``.

``Event`` is the callback's shape, ``(kind, fields)`` with kind ``link``, ``merge`` or
``hot``; ``log_event`` is the default callback, one JSON line each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

Event = Callable[[str, dict[str, Any]], None]   # ("link" | "merge" | "hot", fields)
EVENT_NAMES = {"link": "link_made", "merge": "cluster_merged", "hot": "hot_value"}

log = logging.getLogger("guardproxy.linkage")


def log_event(kind: str, fields: dict[str, Any]) -> None:
    """An ``on_event`` that logs each cluster decision as one JSON line at INFO on
    ``guardproxy.linkage``: ``{"event": "link_made", "a", "b", "weight", "signals",
    "time"}``, ``{"event": "cluster_merged", "cluster", "absorbed", "size"}`` (``absorbed``:
    the id that disappeared into ``cluster``), ``{"event": "hot_value", "signal",
    "digest", "accounts"}`` (digests only, never raw values)."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": EVENT_NAMES.get(kind, kind), **fields}, sort_keys=True))
