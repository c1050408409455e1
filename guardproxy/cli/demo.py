"""``serve --demo``: the built-in fake model API in a background thread of the proxy."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def start_fake_model_thread(host: str = "127.0.0.1") -> str:
    """Start the fake model on a free loopback port; return its base URL once it listens."""
    from guardproxy.fake_model import create_fake_app

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_fake_app(), host=host, port=port,
                                           log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, name="fake-model", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the demo fake model did not start")
    return f"http://{host}:{port}"
