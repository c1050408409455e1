"""What one Redis script call costs the proxy's process: ``python -m bench.redis_calls``.

redis-py's asyncio client, as guardproxy uses it (a registered script, EVALSHA), against
the Redis at ``--url`` (loopback only): CPU microseconds of this process per call and
wall time per call, with ``--concurrency`` callers, for the connection pool guardproxy
uses (``BlockingConnectionPool``: callers beyond its size wait) and the plain one, with
1 and 80 arguments (an admission call carries about 80). Whether ``hiredis`` is
installed is printed: run once with it and once without to compare parsers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from typing import Any

import redis.asyncio as aioredis


async def measure(pool_class: Any, url: str, args: int, calls: int,
                  concurrency: int) -> tuple[float, float]:
    pool = pool_class.from_url(url, max_connections=256)
    client = aioredis.Redis(connection_pool=pool)
    script = client.register_script("return #ARGV")
    payload = ["argument"] * args
    await script(keys=["gp:bench:calls"], args=payload)   # loads the script

    async def caller(n: int) -> None:
        for _ in range(n):
            await script(keys=["gp:bench:calls"], args=payload)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.aclose()
    done = calls // concurrency * concurrency
    return cpu / done * 1e6, wall / done * 1e6


async def main_async(url: str, calls: int, concurrency: int) -> None:
    hiredis = importlib.util.find_spec("hiredis") is not None
    print(f"hiredis installed: {hiredis}; {calls} calls, {concurrency} callers")
    print("| pool | arguments | CPU µs / call | wall µs / call |")
    print("|---|---|---|---|")
    for pool in (aioredis.BlockingConnectionPool, aioredis.ConnectionPool):
        for args in (1, 80):
            cpu, wall = await measure(pool, url, args, calls, concurrency)
            print(f"| {pool.__name__} | {args} | {cpu:.1f} | {wall:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_calls",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if not args.url.startswith(("redis://127.0.0.1", "redis://localhost")):
        raise SystemExit("loopback Redis only")
    asyncio.run(main_async(args.url, args.calls, args.concurrency))


if __name__ == "__main__":
    main()
