"""Change requests in storage, against a real Redis: a dry prepare writes nothing, a held write changes
nothing, approval applies the stored operations or refuses a conflict, and closed requests are pruned."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from gateway.storage import change_requests
from gateway.storage.keys import CHANGE_OPS_KEY, CHANGE_REQUESTS_KEY, MODELS_KEY, list_key
from gateway.storage.ops import (
    ApprovalRequired,
    ApprovalSelf,
    ChangeClosed,
    ChangeConflict,
    HashDelete,
    HashReplace,
    HashSet,
    HashUpdate,
    PreparedWrite,
    ScreeningReplace,
    op_from_json,
    op_to_json,
)
from gateway.storage.store import Store

from .support.gateway_process import ENTRY, seed_policy

STAMP = "2026-01-01T00:00:00Z"


def test_plain_operations_round_trip_through_json() -> None:
    ops = [
        HashSet(list_key("partners"), "lab", {"reason": "r", "added_by": "a"}),
        HashDelete(MODELS_KEY, "gpt-mock", must_exist=False),
        HashReplace(list_key("deny-countries"), {"IR": {"reason": "x"}, "CU": {"reason": "y"}}),
        ScreeningReplace([{"name": "Example Trading", "source": "test"}]),
    ]
    assert [op_from_json(orjson.loads(orjson.dumps(op_to_json(op)))) for op in ops] == ops
    with pytest.raises(ValueError, match="not a stored write operation"):
        op_from_json({"op": "eval"})


async def _propose(store: Store, prepared: PreparedWrite, *, by: str = "alice", now: float | None = None) -> str:
    stamp = time.time() if now is None else now
    record = await store.propose_change(
        prepared,
        proposed_by=by,
        change={"method": "PUT", "path": "/admin/v1/x", "body": None},
        target="t",
        now=stamp,
        now_iso=STAMP,
        expires_at=STAMP,
        ttl_s=3600,
    )
    return str(record["id"])


async def test_prepare_resolves_a_patch_and_writes_nothing(redis_url: str) -> None:
    seed_policy(redis_url)
    store = Store.from_url(redis_url, timeout_s=2)
    try:
        version, _ = await store.read_version()

        def lift(stored: dict[str, Any] | None) -> dict[str, Any]:
            assert stored is not None
            return {**stored, "export_suspended": False, "stage": "general"}

        prepared = await store.prepare([HashUpdate(MODELS_KEY, "gpt-mock", lift)])
        (op,) = prepared.ops
        assert isinstance(op, HashSet) and op.value["stage"] == "general"
        assert prepared.version == version and prepared.generation
        assert set(prepared.guard) == {"models#gpt-mock"}
        assert (await store.read_version())[0] == version
        # A loosening write held for approval: raised with the same resolution, nothing applied.
        with pytest.raises(ApprovalRequired) as held:
            await store.write(
                [HashDelete(list_key("deny-countries"), "IR")],
                actor="alice",
                now_iso=STAMP,
                target="lists/deny-countries/IR",
                hold_for=("loosen",),
            )
        assert held.value.prepared.effect == "loosen"
        assert (await store.read_version())[0] == version
        found = await store.read_hash(list_key("deny-countries"))
        assert found is not None and "IR" in found[1]
    finally:
        await store.close()


async def test_approval_applies_the_stored_operations_or_refuses(redis_url: str) -> None:
    seed_policy(redis_url)
    store = Store.from_url(redis_url, timeout_s=2)
    try:
        prepared = await store.prepare([HashSet(list_key("partners"), "lab", ENTRY)])
        request_id = await _propose(store, prepared)
        with pytest.raises(ApprovalSelf):
            await store.apply_change_request(request_id, approver="alice", now_iso=STAMP, now=time.time())
        version, change, closed = await store.apply_change_request(
            request_id, approver="bob", now_iso=STAMP, now=time.time()
        )
        assert closed["status"] == "applied" and closed["version"] == version == change.version
        assert change.extra == {"change_request": request_id, "proposed_by": "alice", "approved_by": "bob"}
        found = await store.read_hash(list_key("partners"))
        assert found is not None and found[1]["lab"] == ENTRY
        with pytest.raises(ChangeClosed):
            await store.apply_change_request(request_id, approver="bob", now_iso=STAMP, now=time.time())

        # A restore since the proposal (a new generation) is a conflict, even for untouched values.
        prepared = await store.prepare([HashSet(list_key("partners"), "lab-2", ENTRY)])
        request_id = await _propose(store, prepared)
        await store.client.flushall()
        seed_policy(redis_url)
        await store.client.hset(CHANGE_REQUESTS_KEY, request_id, orjson.dumps(_pending(prepared, request_id)))
        await store.client.hset(CHANGE_OPS_KEY, request_id, orjson.dumps([op_to_json(op) for op in prepared.ops]))
        before = (await store.read_version())[0]
        with pytest.raises(ChangeConflict) as conflict:
            await store.apply_change_request(request_id, approver="bob", now_iso=STAMP, now=time.time())
        assert "generation" in conflict.value.changed[0]
        assert (await store.read_version())[0] == before
    finally:
        await store.close()


def _pending(prepared: PreparedWrite, request_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "status": "pending",
        "proposed_by": "alice",
        "expires_at_s": time.time() + 3600,
        "guard": dict(prepared.guard),
        "generation": prepared.generation,
        "target": "t",
    }


async def test_closed_requests_are_pruned_by_age_and_count(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_policy(redis_url)
    monkeypatch.setattr(change_requests, "CHANGE_REQUESTS_MAX", 2)
    store = Store.from_url(redis_url, timeout_s=2)
    try:
        prepared = await store.prepare([HashSet(list_key("partners"), "lab", ENTRY)])
        version = (await store.read_version())[0]
        now = time.time()
        # Closed 40 days ago: pruned at the next proposal whatever the count.
        old = await _propose(store, prepared, now=now - 40 * 86400)
        await store.reject_change(old, rejected_by="bob", reason=None, now=now - 40 * 86400, now_iso=STAMP)
        pending = await _propose(store, prepared, now=now - 2)
        closed = await _propose(store, prepared, now=now - 1)
        await store.reject_change(closed, rejected_by="bob", reason="no", now=now - 1, now_iso=STAMP)
        assert old not in {r["id"] for r in await store.change_requests(status=None, limit=100, now=now)}
        newest = await _propose(store, prepared, now=now)
        # Three would pass the bound of two: the oldest closed one goes, the pending one stays.
        kept = [r["id"] for r in await store.change_requests(status=None, limit=100, now=now)]
        assert kept == [newest, pending]
        assert await store.client.hlen(CHANGE_OPS_KEY) == 2
        assert (await store.read_version())[0] == version  # proposals, rejections and pruning bump nothing
    finally:
        await store.close()
