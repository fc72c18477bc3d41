"""Requests in flight decided again on a new policy version (inflight.py), in-process over a runtime that
create_runtime builds against a real Redis with a fake clock: which requests end and why, and what it costs."""

from __future__ import annotations

import asyncio
import copy
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bootstrap import import_policy
from gateway.identity import Identity, hash_api_key
from gateway.inflight import InFlight
from gateway.proxy import ProxyOutcome
from gateway.runtime import Runtime, create_runtime
from gateway.settings import Settings
from gateway.storage.keys import MODELS_KEY, list_key
from gateway.storage.ops import HashSet, KeyRevoke
from gateway.storage.store import Store

from .support.clock import FakeClock
from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, ENTRY, gateway_config
from .support.tokens import HS_SECRET, hs_token

ENV = {"TEST_HS256_SECRET": HS_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
TIERS = ("public", "partner", "internal")
KEYS = {"key_kept": "gk_" + "k" * 43, "key_gone": "gk_" + "g" * 43}
FRONTIER = {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}


def policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["models"]["frontier"] = FRONTIER
    document["api_keys"] = {
        key_id: {
            "hash": hash_api_key(key),
            "subject": f"svc-{key_id}",
            "org": "acme",
            "org_name": None,
            "country": "US",
            "tier": "partner",
            "expires_at": None,
            "created_at": "2026-01-01T00:00:00Z",
            "created_by": "test",
        }
        for key_id, key in KEYS.items()
    }
    return document


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time() + 60)


@pytest.fixture
async def runtime(tmp_path: Path, store: Store, clock: FakeClock) -> AsyncIterator[Runtime]:
    await import_policy(store, policy(), actor="test", tiers=TIERS)
    config = gateway_config("http://127.0.0.1:9", audit={"spool_dir": str(tmp_path / "spool")})
    async with create_runtime(Settings.model_validate(config), clock=clock, store=store, environ=ENV) as started:
        yield started


async def write(runtime: Runtime, *ops: Any) -> None:
    """A policy write, then the watcher's reload (which runs its callbacks, the registry's among them)."""
    await runtime.store.write(list(ops), actor="test", now_iso="2026-01-01T00:00:00Z", target="test")
    await runtime.watcher.refresh()


class Held:
    """A request held in flight by a task of its own, as the public path holds one while it waits for
    the model server; the registry ends it by cancelling that task."""

    def __init__(self, runtime: Runtime, authorization: str, *, ip: str, model: str) -> None:
        self.runtime, self.authorization, self.ip, self.model = runtime, authorization, ip, model
        self.outcome = ProxyOutcome()
        self.entry: InFlight | None = None
        self.cancelled = asyncio.Event()
        self.task = asyncio.create_task(self._hold())

    async def _hold(self) -> None:
        admission = self.runtime.admission
        identity: Identity = admission.identify(self.authorization, admission.enforced())
        self.entry = InFlight(
            identity,
            authorization=self.authorization if identity.key_id is not None else None,
            transport=None,
            ip=self.ip,
            model=self.model,
            method="POST",
            path="/v1/chat/completions",
            outcome=self.outcome,
        )
        self.runtime.inflight.add(self.entry)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
        finally:
            self.runtime.inflight.discard(self.entry)

    @property
    def code(self) -> str | None:
        return self.outcome.revoked.code if self.outcome.revoked is not None else None


async def hold(runtime: Runtime, authorization: str, *, ip: str = "198.51.100.7", model: str = "gpt-mock") -> Held:
    held = Held(runtime, authorization, ip=ip, model=model)
    await asyncio.sleep(0)  # the task registers its request
    assert held.entry is not None
    return held


async def release(*held: Held) -> None:
    for one in held:
        one.task.cancel()
    await asyncio.gather(*(one.task for one in held), return_exceptions=True)


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def test_a_write_ends_exactly_the_requests_it_refuses(runtime: Runtime) -> None:
    abroad = await hold(runtime, bearer(hs_token("carol", country="FR")), model="frontier")
    at_home = await hold(runtime, bearer(hs_token("dave", country="US")), model="frontier")
    other_model = await hold(runtime, bearer(hs_token("erin", country="FR")), model="gpt-mock")
    await write(runtime, HashSet(MODELS_KEY, "frontier", {**FRONTIER, "export_suspended": True}))
    await asyncio.wait_for(abroad.cancelled.wait(), 1.0)
    assert abroad.code == "export_suspended"
    assert abroad.outcome.revoked is not None and abroad.outcome.revoked.status == 451
    assert (at_home.code, other_model.code) == (None, None)
    assert not at_home.cancelled.is_set() and not other_model.cancelled.is_set()
    assert len(runtime.inflight) == 2  # an ended request leaves the registry
    await release(at_home, other_model)
    assert len(runtime.inflight) == 0


async def test_a_revoked_key_ends_its_requests_and_no_other(runtime: Runtime) -> None:
    gone = await hold(runtime, bearer(KEYS["key_gone"]))
    kept = await hold(runtime, bearer(KEYS["key_kept"]))
    jwt = await hold(runtime, bearer(hs_token("frank")))
    await write(runtime, KeyRevoke("key_gone", revoked_by="test", revoked_at="2026-01-01T00:00:00Z"))
    await asyncio.wait_for(gone.cancelled.wait(), 1.0)
    assert gone.code == "unauthenticated"
    assert (kept.code, jwt.code) == (None, None)
    await release(kept, jwt)


async def test_countries_are_resolved_again_under_the_new_ip_ranges(runtime: Runtime) -> None:
    # The claim says US; the address is about to be mapped to IR, a denied country.
    moved = await hold(runtime, bearer(hs_token("gina", country="US")), ip="198.51.100.7")
    elsewhere = await hold(runtime, bearer(hs_token("hank", country="US")), ip="192.0.2.7")
    await write(runtime, HashSet(list_key("ip-ranges"), "198.51.100.0/24", {**ENTRY, "country": "IR"}))
    await asyncio.wait_for(moved.cancelled.wait(), 1.0)
    assert moved.code == "country_denied"
    assert elsewhere.code is None
    await release(elsewhere)


async def test_a_jwt_expiring_mid_request_is_not_a_revocation(runtime: Runtime, clock: FakeClock) -> None:
    held = await hold(runtime, bearer(hs_token("ivy", ttl=600)))
    clock.advance(3600)  # the token expired long ago; a new request with it would be refused
    await write(runtime, HashSet(list_key("deny-countries"), "KP", ENTRY))
    assert runtime.inflight.decided_total >= 1
    await asyncio.sleep(0.05)
    assert held.code is None and not held.cancelled.is_set()
    await release(held)


async def test_only_a_changed_snapshot_decides_again(runtime: Runtime) -> None:
    held = await hold(runtime, bearer(hs_token("jack")))
    registry, snapshot = runtime.inflight, runtime.watcher.snapshot
    before = registry.decided_total
    registry.policy_changed(snapshot)  # the snapshot it last decided on: nothing changed
    assert registry.decided_total == before
    await runtime.watcher.refresh()  # the version confirmed, unchanged: no swap, no decision
    assert registry.decided_total == before
    await write(runtime, HashSet(list_key("deny-countries"), "KP", ENTRY))
    assert registry.decided_total == before + 1
    await release(held)


async def test_deciding_a_thousand_requests_in_flight_again(runtime: Runtime) -> None:
    """The cost of a new version with 1,000 requests in flight (callers in four countries, one in ten on
    an API key, two models): every one decided again, the refused ones ended."""
    countries = ("US", "FR", "DE", "JP")
    tokens = {
        country: [bearer(hs_token(f"user-{country}-{n}", country=country)) for n in range(5)] for country in countries
    }
    held: list[Held] = []
    for n in range(1000):
        if n % 10 == 0:
            authorization = bearer(KEYS["key_gone" if n % 20 == 0 else "key_kept"])
        else:
            authorization = tokens[countries[n % 4]][n % 5]
        held.append(
            Held(runtime, authorization, ip=f"198.51.{n % 200}.{n % 250 + 1}", model=("gpt-mock", "frontier")[n % 2])
        )
    await asyncio.sleep(0)
    registry, snapshot = runtime.inflight, runtime.watcher.snapshot
    assert snapshot is not None and len(registry) == 1000
    # The cost alone: a version that refuses none of them, decided several times.
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        assert registry.redecide(snapshot) == []
        timings.append(time.perf_counter() - started)
    cost = statistics.median(timings)
    print(f"\ndeciding 1,000 requests in flight again: {cost * 1000:.2f} ms ({cost * 1e6 / 1000:.1f} us each)")
    assert cost < 0.5  # far inside the second a revocation must take, even on a loaded machine
    # A version that refuses some: FR denied, and one API key revoked.
    await write(
        runtime,
        HashSet(list_key("deny-countries"), "FR", ENTRY),
        KeyRevoke("key_gone", revoked_by="test", revoked_at="2026-01-01T00:00:00Z"),
    )
    await asyncio.sleep(0)
    codes = [one.code for one in held]
    expected = [
        ("unauthenticated" if n % 20 == 0 else None) if n % 10 == 0 else ("country_denied" if n % 4 == 1 else None)
        for n in range(1000)
    ]
    assert codes == expected
    assert len(registry) == expected.count(None)
    await release(*held)
