"""One redis-py asyncio client per state URI (single server, Sentinel or Cluster)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

MAX_CONNECTIONS = 256
POOL_TIMEOUT = 10.0  # seconds a request waits for a free connection under load


def blocking_pool(uri: str) -> aioredis.BlockingConnectionPool:
    """Requests beyond the pool size wait for a connection instead of failing."""
    scheme, _, rest = uri.partition("://")
    url = "unix://" + rest if scheme.lower() == "redis+unix" else uri
    return aioredis.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS,
                                                    timeout=POOL_TIMEOUT)


def redis_from_uri(uri: str) -> Any:
    """``redis://``, ``rediss://``, ``redis+unix://``, ``redis+cluster://h:p[,h:p]``,
    ``redis+sentinel://h:p[,h:p]/service[/db]``."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "redis+unix"):
        return aioredis.Redis(connection_pool=blocking_pool(uri))
    if scheme == "redis+cluster":
        first = rest.split(",")[0].split("/")[0]
        return RedisCluster.from_url(f"redis://{first}")
    if scheme == "redis+sentinel":
        parts = urlsplit("redis://" + rest)
        hosts = []
        for host in parts.netloc.rpartition("@")[2].split(","):
            name, _, port = host.partition(":")
            hosts.append((name, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(f"sentinel URI needs a service name: {uri!r}")
        sentinel = Sentinel(hosts, password=parts.password)  # type: ignore[no-untyped-call]
        db = int(path[1]) if len(path) > 1 else 0
        return sentinel.master_for(path[0], db=db)
    raise ValueError(f"not a Redis URI: {uri!r}")


async def preload(client: Any, scripts: list[Any], loaded: set[str]) -> None:
    """Load ``scripts`` (redis-py Script objects) on every primary once, before calls
    sent concurrently: on Redis Cluster, concurrent first calls that all miss the
    script and all reload it can break a connection (seen with redis-py 8.1)."""
    for script in scripts:
        if script.sha not in loaded:
            await client.script_load(script.script)
            loaded.add(script.sha)
