"""What the guards cost, without the network: ``python -m bench.inprocess``.

Each variant's policy (the same ones ``bench.overhead`` serves) wraps a stub model app
that answers at once, and requests are driven through ``GuardMiddleware`` as plain ASGI
calls. The variants run in alternating rounds and each keeps its fastest round, so the
slow drifts of a shared VM's CPU speed fall on all of them alike. Reports CPU
microseconds per request, and the difference to the no-rules variant: the price of the
rules themselves. Redis variants are not here (their cost is round trips, which
``bench.overhead`` measures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import payloads, policies
from guardproxy import GuardMiddleware

VARIANTS = ("guardproxy-norules", "guardproxy-budget", "guardproxy-canary",
            "guardproxy-default-lifted", "guardproxy-full")
_ANSWER = json.dumps({
    "id": "c", "object": "chat.completion", "created": 0, "model": payloads.MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "It is often simple to choose a large, useful plan "
                                        "and then gradually improve it."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
}).encode()


async def model(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": _ANSWER})


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": payloads.PATH,
            "raw_path": payloads.PATH.encode(), "query_string": b"", "scheme": "http",
            "http_version": "1.1", "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8080),
            "headers": [(b"host", b"proxy"), (b"content-type", b"application/json"),
                        (b"authorization", f"Bearer {payloads.API_KEY}".encode())]}


async def one_round(app: GuardMiddleware, requests: int) -> float:
    body = payloads.request_body(False)
    statuses = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.process_time()
    for _ in range(requests):
        await app(_scope(), receive, send)
    spent = time.process_time() - start
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses {sorted(set(statuses))}")
    return spent / requests * 1e6


async def main_async(requests: int, rounds: int, variants: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        apps = {}
        for name in variants:
            policy, _ = policies.write_policy(Path(tmp), name, "http://127.0.0.1:9", None)
            apps[name] = GuardMiddleware(model, policy)
        best = dict.fromkeys(variants, float("inf"))
        for name in variants:  # warm-up: imports, first-use caches
            await one_round(apps[name], 200)
        for _ in range(rounds):
            for name in variants:
                best[name] = min(best[name], await one_round(apps[name], requests))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="per round (5000)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (7)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    best = asyncio.run(main_async(args.requests, args.rounds, variants))
    base = best.get("guardproxy-norules")
    print("| variant | CPU µs / request | rules cost µs |")
    print("|---|---|---|")
    for name, value in best.items():
        added = f"+{value - base:.1f}" if base is not None and name != "guardproxy-norules" \
            else "—"
        print(f"| {name} | {value:.1f} | {added} |")


if __name__ == "__main__":
    main()
