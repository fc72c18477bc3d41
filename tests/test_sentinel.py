"""Redis Sentinel: a gateway on ``redis+sentinel://`` follows a failover of a killed primary.

A real primary, replica and three Sentinels on loopback (tests/support/topology.py). The
primary is SIGKILLed mid-traffic; the test checks what callers saw during the
failover window (only decided answers: the last snapshot's 200/451, or 503
``policy_stale``; never a 500, never a denied caller admitted), that pub/sub and
the version poll follow the promoted replica, and that a list change written
through the Sentinel URL after the failover is enforced within a second. Writes
count only once read back from the primary (docs/hardening.md 23): a write issued during
the failover lands once on the new primary, and one whose reply or request was
lost is neither guessed nor applied twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.storage.clients import StoreUnavailable
from gateway.storage.keys import list_key
from gateway.storage.ops import HashSet
from gateway.storage.store import Store

from .support.gateway_process import CHAT, ENTRY, GatewayProcess, delete_entry, gateway_config, seed_policy, write_entry
from .support.tokens import auth, hs_token
from .support.topology import SentinelTopology
from .support.upstream import Upstream

# A generous tier: this test is about failover, not quotas.
TIERS: dict[str, Any] = {
    "partner": {"requests_per_minute": 600000, "burst": 100000, "stages": ["partners", "general"]},
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
}


@dataclass
class Answer:
    at: float
    caller: str
    status: int
    reason: str
    upstream: bool
    subject_seen: str | None


@dataclass
class Failover:
    old_port: int
    new_port: int
    killed_at: float
    promoted_at: float
    written_at: float
    enforce_s: list[float]  # per gateway: from the write to the first 451
    lift_s: list[float]  # per gateway: from the delete to the first 200 again


@pytest.fixture
def sentinel() -> Iterator[SentinelTopology]:
    with SentinelTopology(down_after_ms=1000, failover_timeout_ms=2000) as topology:
        yield topology


async def ask(client: aiohttp.ClientSession, gateway: GatewayProcess, caller: str, token: str) -> Answer:
    async with client.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(token)) as response:
        body = await response.read()
        seen = None
        if response.headers.get("X-Upstream") == "yes":
            seen = orjson.loads(body)["headers"].get("X-Gateway-Subject")
        return Answer(
            time.monotonic(),
            caller,
            response.status,
            response.headers.get("X-Gateway-Reason", ""),
            response.headers.get("X-Upstream") == "yes",
            seen,
        )


async def traffic(
    client: aiohttp.ClientSession, gateway: GatewayProcess, stop: asyncio.Event, answers: list[Answer]
) -> None:
    """An allowed and a denied caller, back to back, until ``stop``."""
    callers = {"allowed": hs_token("sentinel-ok", country="US"), "denied": hs_token("sentinel-ir", country="IR")}
    while not stop.is_set():
        for caller, token in callers.items():
            try:
                answers.append(await ask(client, gateway, caller, token))
            except aiohttp.ClientError as exc:  # the gateway itself must never drop a caller
                answers.append(Answer(time.monotonic(), caller, -1, type(exc).__name__, False, None))
        await asyncio.sleep(0.005)


async def first_status(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, status: int, within: float
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        async with client.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(token)) as response:
            await response.read()
            if response.status == status:
                return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gateway.url} did not answer {status} within {within}s")


async def fail_over_and_change(
    client: aiohttp.ClientSession, sentinel: SentinelTopology, gateways: tuple[GatewayProcess, GatewayProcess]
) -> Failover:
    """Kill the primary mid-traffic, then change a list and lift it again through the Sentinel URL."""
    await asyncio.sleep(0.5)
    old_port = sentinel.primary_port()
    killed_at = time.monotonic()
    sentinel.server_on(old_port).stop(kill=True)
    new_port = await asyncio.to_thread(sentinel.wait_failover, old_port)
    promoted_at = time.monotonic()
    # Traffic keeps going while the change is written through the Sentinel URL.
    version = await write_entry(sentinel.url, list_key("deny-countries"), "DE")
    written_at = time.monotonic()
    german = hs_token("sentinel-de", country="DE")
    waits = await asyncio.gather(*(first_status(client, g, german, 451, within=3) for g in gateways))
    async with client.post(gateways[1].url + "/v1/chat/completions", json=CHAT, headers=auth(german)) as response:
        assert response.headers["X-Gateway-Policy-Version"] == str(version)
    # Once resubscribed, announcements arrive over the new primary's channel again.
    await asyncio.sleep(0.6)
    await delete_entry(sentinel.url, list_key("deny-countries"), "DE")
    lifted = await asyncio.gather(*(first_status(client, g, german, 200, within=3) for g in gateways))
    await asyncio.sleep(0.5)
    return Failover(old_port, new_port, killed_at, promoted_at, written_at, waits, lifted)


async def test_gateway_follows_a_sentinel_failover_and_never_admits_undecided(
    sentinel: SentinelTopology, upstream: Upstream
) -> None:
    seed_policy(sentinel.url)
    sentinel.wait_replicated()  # the policy must survive the primary's death
    # "fast": a quick poll and a staleness bound shorter than the failover, so it fails closed
    # (503) in the window and must recover by itself. "pubsub": a poll too slow to matter and a
    # long bound (it serves its last snapshot throughout), so changes enforced within a second
    # after the failover prove that its subscription moved to the new primary.
    fast = GatewayProcess(
        gateway_config(upstream.url, tiers=TIERS, policy={"max_staleness_s": 1, "poll_interval_s": 0.1}),
        redis_url=sentinel.url,
    ).start()
    pubsub = GatewayProcess(
        gateway_config(upstream.url, tiers=TIERS, policy={"max_staleness_s": 30, "poll_interval_s": 10}),
        redis_url=sentinel.url,
    ).start()
    try:
        answers: list[Answer] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as client:
            runners = [asyncio.create_task(traffic(client, gateway, stop, answers)) for gateway in (fast, pubsub)]
            try:
                run = await fail_over_and_change(client, sentinel, (fast, pubsub))
            finally:
                stop.set()
                await asyncio.gather(*runners, return_exceptions=True)
        in_window = Counter(a.status for a in answers if run.killed_at <= a.at <= run.written_at)
        print(
            f"\nfailover: primary {run.old_port} killed, {run.new_port} promoted after "
            f"{run.promoted_at - run.killed_at:.2f}s; change enforced {max(run.enforce_s) * 1000:.0f} ms "
            f"after the write, lifted {max(run.lift_s) * 1000:.0f} ms after; {len(answers)} answers, "
            f"in the window {dict(in_window)}"
        )
        assert run.new_port != run.old_port
        assert max(run.enforce_s) < 1.0, run
        assert max(run.lift_s) < 1.0, run

        # During the failover window only decided answers: 200 through the upstream after the
        # policy passed (last snapshot), 451 for the denied caller, or 503 policy_stale.
        for answer in answers:
            if answer.caller == "allowed":
                assert (answer.status, answer.upstream) in {(200, True), (503, False)}, answer
                if answer.status == 200:
                    assert answer.subject_seen == "sentinel-ok", answer
            else:
                assert answer.status in (451, 503) and not answer.upstream, answer
            if answer.status == 503:
                assert answer.reason == "policy_stale", answer
        assert not any(dict(seen.headers).get("X-Gateway-Subject") == "sentinel-ir" for seen in upstream.seen)
        # Traffic flowed before the kill and again after the promotion, through both gateways.
        window = [a for a in answers if run.killed_at <= a.at <= run.written_at]
        after = [a for a in answers if a.at > run.written_at + 1.0 and a.caller == "allowed"]
        assert window and after
        assert all(a.status == 200 for a in after), [a for a in after if a.status != 200]
    finally:
        fast.stop()
        pubsub.stop()


async def test_write_during_a_failover_lands_once_on_the_new_primary(sentinel: SentinelTopology) -> None:
    """A write started while the primary is dead lands once on the promoted replica, confirmed."""
    seed_policy(sentinel.url)
    sentinel.wait_replicated()  # the policy must survive the primary's death
    store = Store.from_url(sentinel.url, timeout_s=2)
    store.write_retry_s = 20.0  # long enough to ride out the whole failover
    try:
        before, _ = await store.read_version()
        assert before is not None
        old_port = sentinel.primary_port()
        sentinel.server_on(old_port).stop(kill=True)
        started = time.monotonic()
        version, change = await store.write(
            [HashSet(list_key("deny-entities"), "mid-failover", ENTRY)],
            actor="test",
            now_iso="2026-01-01T00:00:00Z",
            target="t",
        )
        took = time.monotonic() - started
        assert sentinel.primary_port() != old_port
        assert version == before + 1 == change.version  # applied exactly once
        data = await store.load_policy()
        assert data is not None and data.version == version
        assert b"mid-failover" in data.lists["deny-entities"]  # deny lists stay as Redis returned them
        print(f"\nwrite issued against a dead primary confirmed on the new one after {took:.2f}s")
    finally:
        await store.close()


@pytest.mark.parametrize("lost", ["reply", "request"])
async def test_a_write_whose_outcome_is_unknown_is_read_back(redis_url: str, lost: str) -> None:
    """EXEC's reply lost (the write landed) or the request lost (it did not): applied exactly once."""
    seed_policy(redis_url)
    store = Store.from_url(redis_url, timeout_s=2)
    real = store._write_once
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            if lost == "reply":
                await real(*args, **kwargs)
            raise StoreUnavailable("connection reset by peer")
        await real(*args, **kwargs)

    store._write_once = flaky  # type: ignore[method-assign]
    try:
        before, _ = await store.read_version()
        assert before is not None
        version, change = await store.write(
            [HashSet(list_key("deny-entities"), "once", ENTRY)],
            actor="test",
            now_iso="2026-01-01T00:00:00Z",
            target="t",
        )
        assert version == before + 1 == change.version
        assert (await store.read_version())[0] == version
        assert calls == (1 if lost == "reply" else 2)
        assert [c["version"] for c in await store.read_changes(5)].count(version) == 1
    finally:
        await store.close()
