"""Promises that must hold whatever Redis does (docs/contract.md §5, §10): real redis-server processes
frozen (SIGSTOP), stopped and slowed through a TCP delay proxy, and real gateway processes killed.

- A gateway killed while Redis hangs loses no answered decision older than ``audit.flush_ms``.
- ``redis.timeout_s`` bounds a request's whole wait on Redis, however many calls it makes.
- Policy polls have a deadline of their own (``redis.policy_timeout_s``): a slow Redis is not "no policy".
- What the local limiter admitted while Redis was away is charged to Redis when it returns.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from gateway.redis_server import RedisServer, free_port

from .harness import GatewayProcess, Upstream, gateway_config, seed_policy, wait_until
from .test_audit import assert_exactly, send, stream_length

# --- the audit trail: killed while Redis hangs ------------------------------------------------------


def restarted(config: dict[str, Any]) -> dict[str, Any]:
    """The same configuration (the same spool directory) on new ports."""
    return {**config, "listen": {**config["listen"], "port": free_port()},
            "admin": {**config["admin"], "port": free_port()}}


async def test_a_gateway_killed_while_redis_hangs_loses_no_decision_older_than_flush_ms(
        upstream: Upstream, tmp_path: Path) -> None:
    """Records reach the spool within flush_ms even while the Redis send hangs; the next start sends them once.

    Before, the drain task waited up to a second on the frozen Redis with the records in memory only,
    and a SIGKILL in that second lost every one of them.
    """
    flush_ms = 100
    with RedisServer() as redis:
        seed_policy(redis.url)
        config = gateway_config(upstream.url, policy={"max_staleness_s": 60}, redis={"timeout_s": 0.1},
                                audit={"flush_ms": flush_ms, "spool_dir": str(tmp_path / "spool")})
        first = GatewayProcess(config, redis_url=redis.url).start()
        answered: list[str] = []
        try:
            await send(first, answered, prefix="before", count=3)
            assert wait_until(lambda: stream_length(redis.url) == 3, 5), first.log()
            redis.pause()
            # The first record's batch is sent to the frozen Redis, and its send hangs: the command
            # waits in Redis's socket buffer, and lands when Redis resumes. Everything after it
            # queues behind that send.
            await send(first, answered, prefix="first", count=1)
            frozen_at = time.monotonic()
            await asyncio.sleep(flush_ms / 1000 * 2)
            await send(first, answered, prefix="behind", count=15)
            # Every decision is now older than flush_ms plus a margin for a busy machine; the
            # frozen Redis has held the sender shorter than its one-second send deadline.
            await asyncio.sleep(flush_ms / 1000 * 2.5)
            assert time.monotonic() - frozen_at < 0.9, "too slow to prove anything about a hung send"
        finally:
            first.stop(signal.SIGKILL)
            redis.resume()
        second = GatewayProcess(restarted(config), redis_url=redis.url).start()
        try:
            assert wait_until(lambda: stream_length(redis.url) >= len(answered), 10), second.log()
            await asyncio.sleep(0.5)  # a duplicate would land now
            assert_exactly(redis.url, answered)
        finally:
            second.stop()


async def test_the_spool_is_cut_back_once_redis_holds_every_record(upstream: Upstream, tmp_path: Path) -> None:
    """The write-ahead file does not grow with traffic while Redis takes everything."""
    spool = tmp_path / "spool"
    with RedisServer() as redis:
        seed_policy(redis.url)
        config = gateway_config(upstream.url, audit={"flush_ms": 20, "spool_dir": str(spool)})
        gateway = GatewayProcess(config, redis_url=redis.url).start()
        answered: list[str] = []
        try:
            await send(gateway, answered, prefix="r", count=30)
            assert wait_until(lambda: stream_length(redis.url) == 30, 5), gateway.log()
            assert wait_until(lambda: all(p.stat().st_size == 0 for p in spool.glob("*.jsonl")), 5)
        finally:
            assert gateway.stop() == 0
        assert not list(spool.glob("*.jsonl"))  # a clean stop with everything sent leaves no file
        assert_exactly(redis.url, answered)
