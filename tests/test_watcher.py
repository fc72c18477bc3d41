"""The policy watcher's reloads against a real Redis: only changed parts are read and rebuilt."""

from __future__ import annotations

import copy
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.bootstrap import import_policy
from gateway.policy.model import Snapshot
from gateway.policy.names import LIST_NAMES
from gateway.policy.wire import build_snapshot, policy_document
from gateway.settings import Settings
from gateway.storage.keys import (
    APIKEYS_KEY,
    MODELS_KEY,
    REVS_KEY,
    VERSION_KEY,
    list_key,
    touched_key,
)
from gateway.storage.ops import HashDelete, HashReplace, HashSet, Op
from gateway.storage.policy_store import KnownRevisions
from gateway.storage.store import Store
from gateway.watcher import PolicyWatcher

from .support.gateway_process import BASE_POLICY, ENTRY

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


async def write(store: Store, *ops: Op, target: str = "test") -> int:
    """``ops`` through the store's write path; the new version."""
    version, _change = await store.write(list(ops), actor="test", now_iso="2026-01-01T00:00:00Z", target=target)
    return version


async def put(store: Store, name: str, key: str, **extra: Any) -> int:
    return await write(store, HashSet(list_key(name), key, ENTRY | extra), target=name)


def _fields(name: str, country: str = "DE") -> dict[str, Any]:
    """What an entry of list ``name`` carries beside the common fields."""
    if name == "ip-ranges":
        return {"country": country}
    if name == "country-groups":
        return {"countries": [country, "PL"]}
    if name == "licences":
        return {"org": "lab", "models": ["m1"], "countries": [country], "expires_at": "2099-01-01T00:00:00Z"}
    return {}


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


async def test_a_writer_that_keeps_no_revisions_forces_full_reads(
    watched: tuple[Store, PolicyWatcher], redis_url: str
) -> None:
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


async def test_every_write_path_records_the_parts_it_changed(
    watched: tuple[Store, PolicyWatcher], redis_url: str
) -> None:
    store, _watcher = watched
    raw = aioredis.Redis.from_url(redis_url)
    try:
        before = {k.decode(): int(v) for k, v in (await raw.hgetall(REVS_KEY)).items()}
        version = await write(
            store,
            HashSet(MODELS_KEY, "gpt-new", {"stage": "general"}),
            HashSet(APIKEYS_KEY, "k" * 64, {"subject": "s", "tier": "public"}),
            target="models",
        )
        after = {k.decode(): int(v) for k, v in (await raw.hgetall(REVS_KEY)).items()}
    finally:
        await raw.aclose()
    assert after["models"] == after["apikeys"] == after["at"] == after["delta_at"] == version
    moved = ("models", "apikeys", "at", "delta_at")
    assert {k: v for k, v in after.items() if k not in moved} == {k: v for k, v in before.items() if k not in moved}


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


# --- entry by entry ----------------------------------------------------------------------------


async def drop(store: Store, name: str, key: str) -> int:
    return await write(store, HashDelete(list_key(name), key), target=name)


def held_revisions(watcher: PolicyWatcher) -> KnownRevisions:
    """What the watcher holds now, for asking the store what a reload from here would read."""
    assert watcher._known is not None
    return watcher._known


async def fresh_document(store: Store) -> dict[str, Any]:
    """The policy as a reader with nothing in hand builds it: every part read whole."""
    return policy_document(await fresh_snapshot(store))


def enforced_keys(snapshot: Snapshot) -> dict[str, list[str]]:
    """Each list's keys as the snapshot enforces them (shadow entries left out)."""
    return {name: sorted(snapshot.lists[name]) for name in LIST_NAMES}


async def fresh_snapshot(store: Store) -> Snapshot:
    data = await store.load_policy()
    assert data is not None and not data.deltas and not data.unchanged
    return build_snapshot(
        version=data.version,
        generation=data.generation,
        loaded_at=0.0,
        lists=data.lists,
        models=data.models,
        api_keys=data.api_keys,
    )


async def test_a_change_to_a_large_list_reads_only_the_changed_entries(watched: tuple[Store, PolicyWatcher]) -> None:
    store, watcher = watched
    first = current(watcher)
    parsed = first.lists["deny-entities"]["entity-7"]  # consulted once, so parsed
    known = held_revisions(watcher)
    await put(store, "deny-entities", "entity-new")
    await drop(store, "deny-entities", "entity-3")
    await put(store, "partners", "org-new")
    data = await store.load_policy(known)
    assert data is not None
    # Two entries of the 500-entry list and one of the partners are read, nothing else.
    assert data.lists == {} and set(data.deltas) == {"deny-entities", "partners"}
    assert set(data.deltas["deny-entities"]) == {b"entity-new", b"entity-3"}
    assert data.deltas["deny-entities"][b"entity-3"] is None
    assert list(data.deltas["partners"]) == ["org-new"]
    await watcher.refresh()
    second = current(watcher)
    entities = second.lists["deny-entities"]
    assert "entity-new" in entities and "entity-3" not in entities and len(entities) == 500
    assert "entity-3" in first.lists["deny-entities"]  # the previous snapshot is left as it was
    assert entities["entity-7"] is parsed  # not parsed again
    assert "org-new" in second.lists["partners"] and len(second.lists["partners"]) == 201
    assert second.lists["deny-countries"] is first.lists["deny-countries"]
    assert policy_document(second) == await fresh_document(store)


async def test_a_writer_that_keeps_revisions_but_no_entry_records_forces_a_whole_read(
    watched: tuple[Store, PolicyWatcher], redis_url: str
) -> None:
    # An older gateway during a rolling upgrade keeps the part revisions but not the entry records:
    # the list it changed must be read whole, and the next write starts the records afresh.
    store, watcher = watched
    # Records exist before the older writer comes (so their absence cannot be what gives it away).
    await put(store, "deny-entities", "entity-recorded")
    await watcher.refresh()
    raw = aioredis.Redis.from_url(redis_url)
    try:
        version = int(await raw.get(VERSION_KEY)) + 1
        async with raw.pipeline(transaction=True) as pipe:
            pipe.hset(list_key("deny-entities"), "entity-old-writer", b'{"reason": "r", "source": "s"}')
            pipe.incr(VERSION_KEY)
            pipe.hset(REVS_KEY, mapping={"deny-entities": version, "at": version})
            await pipe.execute()
        data = await store.load_policy(held_revisions(watcher))
        assert data is not None and not data.deltas and set(data.lists) == {"deny-entities"}
        await watcher.refresh()
        assert "entity-old-writer" in current(watcher).lists["deny-entities"]
        # The next regular write cannot vouch for the records: every list is read whole once more ...
        await put(store, "deny-entities", "entity-after")
        known = held_revisions(watcher)
        data = await store.load_policy(known)
        assert data is not None and not data.deltas and "deny-entities" in data.lists
        await watcher.refresh()
        # ... and from then on entry by entry again.
        await put(store, "deny-entities", "entity-later")
        known = held_revisions(watcher)
        data = await store.load_policy(known)
        assert data is not None and list(data.deltas) == ["deny-entities"]
        await watcher.refresh()
        assert policy_document(current(watcher)) == await fresh_document(store)
    finally:
        await raw.aclose()


async def test_change_records_lost_by_hand_force_a_whole_read(
    watched: tuple[Store, PolicyWatcher], redis_url: str
) -> None:
    # The revisions say the list changed; its records do not show that change (the key was deleted by
    # hand, or evicted): reading the records alone would miss the entry.
    store, watcher = watched
    known = held_revisions(watcher)
    await put(store, "deny-entities", "entity-kept-out")
    raw = aioredis.Redis.from_url(redis_url)
    try:
        assert await raw.delete(touched_key("deny-entities")) == 1
    finally:
        await raw.aclose()
    data = await store.load_policy(known)
    assert data is not None and not data.deltas and "deny-entities" in data.lists
    # The next write to the list finds its records gone and starts them again from itself: a reader
    # from before still reads the list whole (its records would show the new entry only) ...
    await put(store, "deny-entities", "entity-after-loss")
    data = await store.load_policy(known)
    assert data is not None and not data.deltas and "deny-entities" in data.lists
    await watcher.refresh()
    entities = current(watcher).lists["deny-entities"]
    assert "entity-kept-out" in entities and "entity-after-loss" in entities
    # ... and a reader from then on reads entry by entry again.
    held = held_revisions(watcher)
    await put(store, "deny-entities", "entity-later")
    data = await store.load_policy(held)
    assert data is not None and list(data.deltas) == ["deny-entities"]


async def test_a_reader_older_than_the_trimmed_records_reads_the_list_whole(
    watched: tuple[Store, PolicyWatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.storage.policy_store.TOUCHED_CAP", 5)
    store, watcher = watched
    old = held_revisions(watcher)
    for i in range(4):
        await put(store, "deny-entities", f"entity-a{i}")
    await watcher.refresh()
    recent = held_revisions(watcher)
    for i in range(4):  # past the cap: the oldest records are trimmed
        await put(store, "deny-entities", f"entity-b{i}")
    stale = await store.load_policy(old)
    assert stale is not None and not stale.deltas and "deny-entities" in stale.lists
    fresh = await store.load_policy(recent)
    assert fresh is not None and set(fresh.deltas["deny-entities"]) == {f"entity-b{i}".encode() for i in range(4)}
    await watcher.refresh()
    assert policy_document(current(watcher)) == await fresh_document(store)


async def test_entry_by_entry_reloads_agree_with_whole_reads_over_random_writes(
    watched: tuple[Store, PolicyWatcher], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any mix of single-entry writes, deletes, whole-list replaces, writes to other parts, writers that
    # keep nothing, and trimmed records: after every step the incrementally kept snapshot is the
    # policy a fresh reader reads whole.
    monkeypatch.setattr("gateway.storage.policy_store.TOUCHED_CAP", 12)
    store, watcher = watched
    rng = random.Random(20261128)
    raw = aioredis.Redis.from_url(redis_url)
    lagging = PolicyWatcher(store, watcher.settings)  # refreshes only now and then: larger spans
    await lagging.refresh()
    kinds: list[str] = []
    shadows_seen = 0
    try:
        for step in range(120):
            name = rng.choice(LIST_NAMES)
            key = f"k{rng.randrange(30)}"
            value = ENTRY | _fields(name)
            if name == "ip-ranges":
                key = f"203.0.{rng.randrange(30)}.0/24"
            kind = rng.choices(["set", "delete", "replace", "models", "raw", "several"], [8, 4, 1, 1, 1, 2])[0]
            kinds.append(kind)
            if kind == "set":
                # A third of the writes are shadow entries, so a later write to the same key promotes
                # one, demotes a live one or replaces one shadow with another.
                shadow = {"enforce": False} if rng.random() < 0.33 else {}
                await put(store, name, key, **_fields(name), **shadow)
            elif kind == "delete":
                await write(store, HashDelete(list_key(name), key, must_exist=False), target=name)
            elif kind == "replace":
                entries = {f"{key}-{i}" if name != "ip-ranges" else f"198.51.{i}.0/24": value for i in range(3)}
                await write(store, HashReplace(list_key(name), entries), target=name)
            elif kind == "models":
                await write(store, HashSet(MODELS_KEY, f"m{step}", {"stage": "general"}), target="models")
            elif kind == "raw":
                async with raw.pipeline(transaction=True) as pipe:
                    pipe.hset(list_key(name), key, orjson.dumps(value))
                    pipe.incr(VERSION_KEY)
                    await pipe.execute()
            else:
                other = rng.choice(LIST_NAMES)
                ops = [
                    HashSet(
                        list_key(other),
                        f"{key}-s{i}" if other != "ip-ranges" else f"192.0.{i}.0/24",
                        ENTRY | _fields(other, "FR"),
                    )
                    for i in range(3)
                ]
                await write(store, *ops, HashDelete(list_key(name), key, must_exist=False), target=name)
            await watcher.refresh()
            fresh = await fresh_snapshot(store)
            expected, enforced = policy_document(fresh), enforced_keys(fresh)
            # The whole policy (shadow entries included) and what is enforced agree with a whole read.
            assert policy_document(current(watcher)) == expected, (step, kinds[-3:])
            assert enforced_keys(current(watcher)) == enforced, (step, kinds[-3:])
            assert (current(watcher).shadow is None) == (fresh.shadow is None), step
            shadows_seen += fresh.shadow is not None
            if rng.random() < 0.2:
                await lagging.refresh()
                assert policy_document(current(lagging)) == expected, (step, "lagging")
                assert enforced_keys(current(lagging)) == enforced, (step, "lagging")
    finally:
        await raw.aclose()
    assert {"set", "delete", "replace", "raw", "several"} <= set(kinds)
    assert shadows_seen, "no step held a shadow entry"


async def test_close_returns_however_a_cancel_meets_the_poll_timer(redis_url: str) -> None:
    """A cancel landing with the poll timer's expiry can be read as the timeout and swallowed; the
    watcher must stop all the same (a process that failed after starting once never exited)."""
    import asyncio

    store = Store.from_url(redis_url, timeout_s=2)
    await import_policy(store, big_policy(), actor="test", tiers=TIERS)
    settings = Settings.model_validate(
        {"upstream": {"url": "http://127.0.0.1:9"}, "policy": {"poll_interval_s": 0.001}}
    )
    try:
        for attempt in range(60):
            watcher = PolicyWatcher(store, settings)
            await watcher.start()
            await asyncio.sleep(0.001 * (attempt % 7))  # land the cancel at every phase of the timer
            await asyncio.wait_for(watcher.close(), timeout=10)
            assert watcher._tasks == []
    finally:
        await store.close()


async def test_shadow_entries_added_promoted_and_removed_reload_entry_by_entry(
    watched: tuple[Store, PolicyWatcher],
) -> None:
    store, watcher = watched
    first = current(watcher)
    assert first.shadow is None
    await put(store, "deny-entities", "entity-shadow", enforce=False)
    await watcher.refresh()
    added = current(watcher)
    assert "entity-shadow" not in added.lists["deny-entities"] and len(added.lists["deny-entities"]) == 500
    assert added.shadow is not None and "entity-shadow" in added.shadow.lists["deny-entities"]
    assert added.shadow.lists["partners"] is added.lists["partners"]  # lists without shadows are shared
    await put(store, "deny-entities", "entity-shadow")  # promoted
    await watcher.refresh()
    promoted = current(watcher)
    assert "entity-shadow" in promoted.lists["deny-entities"] and promoted.shadow is None
    await put(store, "deny-entities", "entity-7", enforce=False)  # a live entry made a shadow
    await watcher.refresh()
    demoted = current(watcher)
    assert "entity-7" not in demoted.lists["deny-entities"]
    assert demoted.shadow is not None and "entity-7" in demoted.shadow.lists["deny-entities"]
    await drop(store, "deny-entities", "entity-7")
    await watcher.refresh()
    assert current(watcher).shadow is None and "entity-7" not in current(watcher).lists["deny-entities"]
    assert policy_document(current(watcher)) == await fresh_document(store)
