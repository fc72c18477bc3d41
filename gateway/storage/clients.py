"""The redis-py client for a standalone, Sentinel or Cluster URL, and the deadline every call on it runs under.

Redis errors and timeouts are turned into :class:`StoreUnavailable` here, so no module outside
``gateway.storage`` handles redis-py types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError, RedisError, WatchError

from ..errors import BackendUnavailable

# The logger name the store logged under before the split, so log lines read as before.
log = logging.getLogger("gateway.store")


class StoreUnavailable(BackendUnavailable):
    """Redis did not answer (refused, reset, timed out)."""


def _hosts(netloc: str) -> list[tuple[str, int]]:
    """``h1:p1,h2:p2`` (credentials before ``@`` ignored: the password comes from password_env)."""
    out = []
    for item in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis url: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def build_client(url: str, *, password: str | None, tls: Mapping[str, Any] | None = None) -> Any:
    """A redis-py asyncio client for a standalone, Sentinel or Cluster URL.

    ``tls`` holds redis-py's ``ssl_*`` keyword arguments (``RedisSettings.tls_options``);
    they apply to the ``rediss`` forms only. No client here retries on its own for long:
    every call is bounded by the store's deadline and the callers decide what a miss means.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme
    secure = scheme in ("rediss", "rediss+sentinel", "rediss+cluster")
    tls_kwargs: dict[str, Any] = {**(tls or {}), "ssl": True} if secure else {}
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        query = parse_qs(parsed.query)
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, **tls_kwargs}
        if query.get("sentinel_password"):
            sentinel_kwargs["password"] = query["sentinel_password"][0]
        # SentinelConnectionPool asks the Sentinels for the primary on every new connection,
        # so a connection lost in a failover is re-made to the promoted replica.
        sentinel = Sentinel(_hosts(parsed.netloc), sentinel_kwargs=sentinel_kwargs, password=password, **tls_kwargs)
        return sentinel.master_for(
            parsed.path.strip("/") or "mymaster",
            socket_timeout=None,
            socket_connect_timeout=2.0,
            retry_on_timeout=False,
        )
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in _hosts(parsed.netloc)],
            password=password,
            socket_connect_timeout=2.0,
            **tls_kwargs,
        )
    kwargs: dict[str, Any] = {"socket_connect_timeout": 2.0, "health_check_interval": 0}
    if password:
        kwargs["password"] = password
    if secure:
        kwargs.update(tls or {})  # from_url sets the SSL connection class for rediss:// itself
    return aioredis.Redis.from_url(url, **kwargs)


class RedisAccess:
    """One redis-py client, the store's deadlines, and the failure accounting every part of the store shares."""

    def __init__(
        self, client: Any, *, timeout_s: float, load_timeout_s: float | None = None, policy_timeout_s: float = 2.0
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s  # the hot path's: a request's whole wait on Redis
        # Policy polls are off the hot path: a Redis slower than timeout_s still confirms the policy,
        # rather than the whole fleet failing closed at max_staleness_s although Redis answers.
        self.policy_timeout_s = policy_timeout_s
        # Whole-policy loads move megabytes; they get a longer, still bounded, deadline.
        self.load_timeout_s = load_timeout_s or max(2.0, timeout_s * 20, policy_timeout_s)
        # How long a write keeps retrying a failed connection (a failover, a restart) before
        # it gives up; short, because an operator waits on it and can simply try again.
        self.write_retry_s = 1.0
        self.on_error: Callable[[str], None] = lambda op: None
        self.is_cluster = isinstance(client, RedisCluster)
        self._unlogged_failures = 0
        self._last_failure_log = -1e9

    async def _bounded(self, op: str, awaitable: Awaitable[Any], deadline_s: float | None = None) -> Any:
        try:
            async with asyncio.timeout(deadline_s or self.timeout_s):
                return await awaitable
        except (RedisError, OSError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: uvloop's "unable to perform operation on <TCPTransport closed=True>"
            # when Redis resets a connection under redis-py; it is a transport failure too.
            if isinstance(exc, (WatchError, NoScriptError)):
                raise
            self.on_error(op)
            raise StoreUnavailable(f"redis {op}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._bounded("ping", self.client.ping(), self.policy_timeout_s))
        except StoreUnavailable:
            return False

    def _note_failure(self, message: str) -> None:
        """A hot-path failure, logged at most once a second (a burst fails many calls at once)."""
        now = asyncio.get_running_loop().time()
        self._unlogged_failures += 1
        if now - self._last_failure_log >= 1.0:
            log.warning("%s (%d hot-path Redis failures since the last such line)", message, self._unlogged_failures)
            self._unlogged_failures = 0
            self._last_failure_log = now

    async def close(self) -> None:
        close = getattr(self.client, "aclose", None) or self.client.close
        await close()
        # A Sentinel-managed client also holds one connection per Sentinel it asked.
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()
