"""The store's script calls (gateway/storage/scripts.py): which transport the store chooses, and the
semantics both transports share."""

from __future__ import annotations

import pytest

from gateway.ratelimit import rate_keys
from gateway.storage.clients import StoreUnavailable
from gateway.storage.scripts import RedisPyTransport, WireTransport
from gateway.storage.store import Store


@pytest.mark.parametrize(
    ("url", "lean_wire", "transport"),
    [
        ("redis://127.0.0.1:6379/0", True, WireTransport),
        ("rediss://127.0.0.1:6380/0", True, WireTransport),
        ("unix:///tmp/redis.sock", True, WireTransport),
        ("redis://127.0.0.1:6379/0", False, RedisPyTransport),
        ("redis+sentinel://127.0.0.1:26379/mymaster", True, RedisPyTransport),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", True, RedisPyTransport),
    ],
)
async def test_the_store_chooses_the_transport_from_the_url(url: str, lean_wire: bool, transport: type) -> None:
    """The lean wire speaks to one server; Sentinel and Cluster need redis-py's discovery and routing."""
    store = Store.from_url(url, timeout_s=0.1, lean_wire=lean_wire)
    try:
        assert isinstance(store._transport, transport)
        assert (store.wire is not None) == (transport is WireTransport)
    finally:
        await store.close()


@pytest.mark.parametrize("lean_wire", [True, False], ids=["wire", "redis-py"])
async def test_an_error_reply_is_counted_apart_from_a_missed_deadline(redis_url: str, lean_wire: bool) -> None:
    """A Lua error is Redis answering, never a slow network: ``op="script_error"``, not ``op="script"``."""
    store = Store.from_url(redis_url, timeout_s=0.1, lean_wire=lean_wire)
    errors: list[str] = []
    store.on_error = errors.append
    try:
        with pytest.raises(StoreUnavailable, match="ERR" if lean_wire else None):
            await store.run_script("ratelimit", rate_keys("ivy", "m"), ("not-a-number", "5", "0", ""))
        assert errors == ["script_error"]
    finally:
        await store.close()
