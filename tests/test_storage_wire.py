"""The lean RESP connection: replies pair with their commands even through cancellations and faults."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.redis_server import RedisServer
from gateway.storage.wire import DeadlineExceeded, ReplyError, RespConnection, WireError, pack

from .support.faultproxy import FaultProxy


async def test_replies_match_commands_through_a_cancellation_storm(redis_url: str) -> None:
    wire = RespConnection(redis_url, deadline_s=2)
    try:
        await wire.call(pack("SET", "k", "v"))

        async def echo(i: int) -> bytes:
            return await wire.call(pack("ECHO", f"value-{i}"))

        tasks = [asyncio.ensure_future(echo(i)) for i in range(2000)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()  # half the callers give up while their commands are in flight
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 2 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == f"value-{i}".encode()
        assert await wire.call(pack("GET", "k")) == b"v"
    finally:
        await wire.close()


async def test_error_replies_raise_and_the_stream_continues(redis_url: str) -> None:
    wire = RespConnection(redis_url, deadline_s=2)
    try:
        with pytest.raises(ReplyError, match="NOSCRIPT"):
            await wire.call(pack("EVALSHA", "0" * 40, 0))
        assert await wire.call(pack("PING")) == b"PONG"
    finally:
        await wire.close()


async def test_reconnects_after_a_restart(fresh_redis: RedisServer) -> None:
    wire = RespConnection(fresh_redis.url, deadline_s=2)
    try:
        assert await wire.call(pack("PING")) == b"PONG"
        fresh_redis.restart()
        with contextlib.suppress(WireError):
            await wire.call(pack("PING"))  # may fail once: the old connection is gone
        assert await wire.call(pack("PING")) == b"PONG"
    finally:
        await wire.close()


async def test_refused_connection_is_a_wire_error() -> None:
    server = RedisServer()
    url = server.url  # never started
    wire = RespConnection(url, deadline_s=0.2)
    with pytest.raises(WireError, match="connect failed"):
        await wire.call(pack("PING"))
    await wire.close()


async def test_stalled_connection_fails_within_its_deadline_and_is_replaced(redis_server: RedisServer) -> None:
    proxy = FaultProxy(redis_server.port).start()
    wire = RespConnection(proxy.url, deadline_s=0.2)
    try:
        assert await wire.call(pack("PING")) == b"PONG"
        proxy.set("blackhole")
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(wire.call(pack("PING")) for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, DeadlineExceeded) for r in results)
        assert loop.time() - started < 0.2 * 1.25 + 0.1
        proxy.set("pass")
        assert await wire.call(pack("PING")) == b"PONG"
        assert proxy.connections == 2
    finally:
        await wire.close()
        proxy.stop()


async def test_busy_connection_batches_commands(redis_url: str) -> None:
    wire = RespConnection(redis_url, deadline_s=2)
    try:
        results = await asyncio.gather(*(wire.call(pack("INCR", "counter")) for _ in range(500)))
        assert sorted(results) == list(range(1, 501))
        assert results == list(range(1, 501))  # sent and answered in call order
    finally:
        await wire.close()


async def test_password_and_database_from_the_url() -> None:
    with RedisServer(extra_args=["--requirepass", "s3cret"]) as server:
        bad = RespConnection(f"redis://127.0.0.1:{server.port}/0", deadline_s=2)
        with pytest.raises(ReplyError, match="NOAUTH"):
            await bad.call(pack("SET", "a", "1"))
        await bad.close()
        wire = RespConnection(f"redis://:s3cret@127.0.0.1:{server.port}/3", deadline_s=2)
        try:
            await wire.call(pack("SET", "a", "in-db-3"))
            assert await wire.call(pack("GET", "a")) == b"in-db-3"
        finally:
            await wire.close()
        other = RespConnection(f"redis://127.0.0.1:{server.port}/0", deadline_s=2, password="s3cret")
        try:
            assert await other.call(pack("GET", "a")) is None
        finally:
            await other.close()


async def test_a_connect_whose_only_caller_gave_up_is_not_handed_out_after_it_drops(redis_server: RedisServer) -> None:
    proxy = FaultProxy(redis_server.port).start()
    wire = RespConnection(proxy.url, deadline_s=0.5)
    try:
        first = asyncio.ensure_future(wire.call(pack("PING")))
        await asyncio.sleep(0)
        first.cancel()  # the caller went away while the connection was being made
        await asyncio.sleep(0.2)
        proxy.set("reset")  # that connection drops before anyone uses it
        await asyncio.sleep(0.1)
        proxy.set("pass")
        async with asyncio.timeout(2):  # never a hang: an answer or a clear error
            try:
                reply = await wire.call(pack("PING"))
            except WireError:
                reply = await wire.call(pack("PING"))
        assert reply == b"PONG"
    finally:
        await wire.close()
        proxy.stop()


async def test_a_saturated_caller_is_no_redis_fault(redis_url: str) -> None:
    """Replies read late because this process's loop was busy do not fail the connection."""
    wire = RespConnection(redis_url, deadline_s=0.05)
    try:
        assert await wire.call(pack("PING")) == b"PONG"  # connected
        first = asyncio.ensure_future(wire.call(pack("INCR", "n")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first command is on the wire
        pending = [asyncio.ensure_future(wire.call(pack("INCR", "n"))) for _ in range(100)]
        await asyncio.sleep(0)  # these queue behind it
        time.sleep(0.2)  # noqa: ASYNC251 - the loop is blocked past the deadline while Redis answers
        results = await asyncio.gather(first, *pending)
        assert results == list(range(1, 102))
    finally:
        await wire.close()
