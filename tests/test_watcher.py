"""The policy watcher's reloads against a real Redis: only changed parts are read and rebuilt."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.bootstrap import import_policy
from gateway.policy import Snapshot
from gateway.settings import Settings
from gateway.store import APIKEYS_KEY, MODELS_KEY, REVS_KEY, VERSION_KEY, HashSet, Store, list_key
from gateway.watcher import PolicyWatcher

from .harness import BASE_POLICY, ENTRY

TIERS = ("public", "partner", "internal")


def big_policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["lists"]["deny-entities"] = {f"entity-{i}": {"reason": "test", "source": "test"} for i in range(500)}
    document["lists"]["partners"] = {f"org-{i}": {"reason": "test", "source": "test"} for i in range(200)}
    return document


@pytest.fixture
async def watched(redis_url: str) -> AsyncIterator[tuple[Store, PolicyWatcher]]:
    store = Store.from_url(redis_url, timeout_s=2)
    await import_policy(store, big_policy(), actor="test", tiers=TIERS)
    settings = Settings.model_validate({"upstream": {"url": "http://127.0.0.1:9"}})
    watcher = PolicyWatcher(store, settings)
    await watcher.refresh()
    try:
        yield store, watcher
    finally:
        await store.close()


async def put(store: Store, name: str, key: str, **extra: str) -> int:
    version, _change = await store.write([HashSet(list_key(name), key, ENTRY | extra)], actor="test",
                                         now_iso="2026-01-01T00:00:00Z", target=name)
    return version


def current(watcher: PolicyWatcher) -> Snapshot:
    assert watcher.snapshot is not None
    return watcher.snapshot


async def test_a_change_to_one_list_rebuilds_only_that_list(watched: tuple[Store, PolicyWatcher]) -> None:
    store, watcher = watched
    first = current(watcher)
    assert len(first.lists["deny-entities"]) == 500
    version = await put(store, "deny-countries", "KP")
    await watcher.refresh()
    second = current(watcher)
    assert second.version == version
    assert "KP" in second.lists["deny-countries"] and "KP" not in first.lists["deny-countries"]
    # The large parts are the very objects of the previous snapshot: neither read nor parsed again.
    for name in ("deny-entities", "partners", "ip-ranges"):
        assert second.lists[name] is first.lists[name], name
    assert second.models is first.models and second.api_keys is first.api_keys
    # A change to the large list itself is read.
    version = await put(store, "deny-entities", "entity-new")
    await watcher.refresh()
    third = current(watcher)
    assert third.version == version and "entity-new" in third.lists["deny-entities"]
    assert third.lists["deny-countries"] is second.lists["deny-countries"]


async def test_a_writer_that_keeps_no_revisions_forces_full_reads(watched: tuple[Store, PolicyWatcher],
                                                                   redis_url: str) -> None:
    # A writer that does not keep the part revisions (an older gateway during a rolling upgrade, an
    # operator's raw command) bumps the version alone: every part must be read, never trusted stale.
    store, watcher = watched
    first = current(watcher)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with raw.pipeline(transaction=True) as pipe:
            pipe.hset(list_key("deny-entities"), "entity-raw", b'{"reason": "raw", "source": "raw"}')
            pipe.incr(VERSION_KEY)
            await pipe.execute()
        await watcher.refresh()
        second = current(watcher)
        assert "entity-raw" in second.lists["deny-entities"]
        assert second.lists["partners"] is not first.lists["partners"]  # nothing reused
        # The next regular write cannot vouch for what the raw writer did: it marks every part.
        await put(store, "deny-countries", "KP")
        revs = {k.decode(): int(v) for k, v in (await raw.hgetall(REVS_KEY)).items()}
        assert len(set(revs.values())) == 1, revs
        await watcher.refresh()
        third = current(watcher)
        assert third.lists["partners"] is not second.lists["partners"]
        assert "entity-raw" in third.lists["deny-entities"] and "KP" in third.lists["deny-countries"]
        # From then on, reloads are incremental again.
        await put(store, "ip-ranges", "203.0.113.0/24", country="DE")
        await watcher.refresh()
        assert current(watcher).lists["partners"] is third.lists["partners"]
    finally:
        await raw.aclose()


async def test_a_new_policy_generation_is_read_whole(watched: tuple[Store, PolicyWatcher], redis_url: str) -> None:
    store, watcher = watched
    first = current(watcher)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.flushall()
    finally:
        await raw.aclose()
    await import_policy(store, big_policy(), actor="test", tiers=TIERS)
    await watcher.refresh()
    second = current(watcher)
    assert second.generation != first.generation
    for name in ("deny-countries", "deny-entities", "partners", "ip-ranges"):
        assert second.lists[name] is not first.lists[name], name
    assert second.models is not first.models


async def test_every_write_path_records_the_parts_it_changed(watched: tuple[Store, PolicyWatcher],
                                                              redis_url: str) -> None:
    store, _watcher = watched
    raw = aioredis.Redis.from_url(redis_url)
    try:
        before = {k.decode(): int(v) for k, v in (await raw.hgetall(REVS_KEY)).items()}
        version, _ = await store.write([HashSet(MODELS_KEY, "gpt-new", {"stage": "general"}),
                                        HashSet(APIKEYS_KEY, "k" * 64, {"subject": "s", "tier": "public"})],
                                       actor="test", now_iso="2026-01-01T00:00:00Z", target="models")
        after = {k.decode(): int(v) for k, v in (await raw.hgetall(REVS_KEY)).items()}
    finally:
        await raw.aclose()
    assert after["models"] == after["apikeys"] == after["at"] == version
    assert {k: v for k, v in after.items() if k not in ("models", "apikeys", "at")} == {
        k: v for k, v in before.items() if k not in ("models", "apikeys", "at")}


async def test_an_expiring_ip_range_stops_applying_without_a_policy_change(redis_url: str) -> None:
    # The ip-ranges map is derived once per snapshot; an override that expires must leave it when it
    # expires, not at the next change of the policy.
    store = Store.from_url(redis_url, timeout_s=2)
    now = [1_893_455_990.0]  # ten seconds before 2030-01-01T00:00:00Z
    try:
        await import_policy(store, big_policy(), actor="test", tiers=TIERS)
        await put(store, "ip-ranges", "198.51.100.0/24", country="DE", expires_at="2030-01-01T00:00:00Z")
        await put(store, "ip-ranges", "203.0.113.0/24", country="FR")
        settings = Settings.model_validate({"upstream": {"url": "http://127.0.0.1:9"}})
        watcher = PolicyWatcher(store, settings, clock=lambda: now[0])
        await watcher.refresh()
        first = current(watcher)
        assert dict(first.ip_ranges) == {"198.51.100.0/24": "DE", "203.0.113.0/24": "FR"}
        now[0] += 9.9
        await watcher.refresh()
        assert current(watcher) is first  # nothing expired yet: the same snapshot
        now[0] += 0.1
        await watcher.refresh()
        second = current(watcher)
        assert dict(second.ip_ranges) == {"203.0.113.0/24": "FR"}
        assert second.version == first.version and second.lists["deny-entities"] is first.lists["deny-entities"]
        assert second.ip_ranges_expire_at == float("inf")
    finally:
        await store.close()
