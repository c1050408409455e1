"""Counting Redis round trips: the commands clients send while a block runs (MONITOR)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis


@contextmanager
def monitored(url: str, prefix: str) -> Iterator[list[list[str]]]:
    """Every command naming ``prefix`` that a client sends while the block runs, split
    into words (``[["EVALSHA", "<sha>", ...], ...]``); commands run inside Lua scripts
    are left out: one script call is one round trip."""
    commands: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        client: Any = redis.Redis.from_url(url)
        with client.monitor() as m:
            for event in m.listen():
                if prefix in event["command"] and event.get("client_type") != "lua":
                    commands.append(event["command"].split())
                if stop.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.3)   # MONITOR is listening
    try:
        yield commands
    finally:
        time.sleep(0.3)   # what the block set off (settles after a response) arrives
        stop.set()
        redis.Redis.from_url(url).get(f"{prefix}:wake")   # let listen() return
        watcher.join(timeout=5)


def names(commands: list[list[str]]) -> list[str]:
    return [c[0].upper() for c in commands]
