"""``/metrics`` as an ASGI app, and the multiprocess directory's upkeep.

One process: the text is rendered from the process's registry. Several workers
(``PROMETHEUS_MULTIPROC_DIR`` set before the workers start): every worker writes its
values to files there and a scrape, whichever worker serves it, merges all the files
(``prometheus_client.multiprocess.MultiProcessCollector``). Rendering runs in a worker
thread: merging files is disk I/O the event loop must not wait on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio.to_thread
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Receive, Scope, Send

from guardproxy.metrics.observer import MetricsObserver

log = logging.getLogger("guardproxy.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Create ``path`` and delete the ``*.db`` files a previous run left (their totals
    would be added to this run's). Call once, in the parent, before workers start;
    then set ``os.environ[MULTIPROC_ENV] = str(path)`` so the workers inherit it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return folder


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (``guardproxy_policy_info``, the load time);
    its counters stay in the totals. No-op outside multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render(observer: MetricsObserver, accept: str) -> tuple[bytes, str]:
    """(body, content type) for an ``Accept`` header: the Prometheus text format, or
    OpenMetrics when asked. Blocking in multiprocess mode (reads the files)."""
    metrics = observer.metrics
    registry = metrics.registry
    if metrics.multiprocess:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=os.environ.get(MULTIPROC_ENV))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def metrics_app(observer: MetricsObserver) -> ASGIApp:
    """An ASGI app answering GET and HEAD with the exposition (any path: mount it at
    ``/metrics``); other methods get 405. ``observer``: ``metrics_for``'s."""
    if os.environ.get(MULTIPROC_ENV) and not observer.metrics.multiprocess:
        log.warning("%s is set but prometheus_client was imported before it was: this "
                    "worker serves its own metrics only", MULTIPROC_ENV)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, 405, b"method not allowed\n", "text/plain; charset=utf-8",
                        [(b"allow", b"GET, HEAD")])
            return
        accept = ",".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"accept")
        observer.sources.sync()   # on the loop: the sources are not thread-safe
        body, content_type = await anyio.to_thread.run_sync(render, observer, accept)
        await _send(send, 200, b"" if scope["method"] == "HEAD" else body, content_type,
                    [], len(body))

    return app


async def _send(send: Send, status: int, body: bytes, content_type: str,
                extra: list[tuple[bytes, bytes]], length: int | None = None) -> None:
    size = len(body) if length is None else length
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(size).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
