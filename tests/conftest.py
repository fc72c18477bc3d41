"""Shared fixtures: real redis-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import settings

from gateway.redis_server import RedisServer
from gateway.storage.store import Store

from .support.faultproxy import FaultProxy
from .support.upstream import Upstream

# The property tests check properties, not timings: on a loaded machine (the suite run in the background,
# beside other work) one example can outlast hypothesis' 200 ms default deadline and fail a correct test.
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests that need isolation use ``fresh_redis``."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, emptied before the test."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill, pause or restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    """A store on the emptied session server, closed after the test."""
    store = Store.from_url(redis_url, timeout_s=2)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def proxied() -> Iterator[tuple[RedisServer, FaultProxy]]:
    """A redis-server of the test's own behind a fault proxy (to cut, blackhole or delay it)."""
    with RedisServer() as server:
        proxy = FaultProxy(server.port).start()
        try:
            yield server, proxy
        finally:
            proxy.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def clean_upstream(upstream: Upstream) -> Upstream:
    upstream.reset()
    return upstream
