"""Change requests (the two-person rule): a write held for a second admin's approval, stored beside
the policy under its hash tag, listed, rejected, pruned. Approval itself is a policy write
(:meth:`PolicyStore.apply_change_request`), so it shares the write path's transaction and retries."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import orjson
from redis.exceptions import WatchError

from .clients import StoreUnavailable
from .keys import (
    CHANGE_OPS_KEY,
    CHANGE_REQUESTS_KEEP_S,
    CHANGE_REQUESTS_KEY,
    CHANGE_REQUESTS_MAX,
    CHANGE_RETIRE_KEY,
    CHANGES_KEY,
    CHANGES_MAXLEN,
)
from .ops import ChangeClosed, ChangeExpired, ChangeRequestMissing, PreparedWrite, op_to_json, request_status
from .policy_store import PolicyStore

# Fields kept in the stored record for the store's own use, not shown to people.
INTERNAL_FIELDS = ("guard", "expires_at_s", "import_whole", "target")


def new_request_id(now: float) -> str:
    """Ids that sort by creation time (milliseconds, hex) and cannot be guessed."""
    return f"cr_{int(now * 1000):012x}{secrets.token_hex(4)}"


def public_request(record: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A stored request as the API shows it: its status as of ``now``, internal fields left out."""
    shown = {key: value for key, value in record.items() if key not in INTERNAL_FIELDS}
    shown["status"] = request_status(record, now)
    return shown


class ChangeRequestStore(PolicyStore):
    """Proposing, reading and rejecting change requests."""

    async def propose_change(
        self,
        prepared: PreparedWrite,
        *,
        proposed_by: str,
        change: Mapping[str, Any],
        target: str,
        now: float,
        now_iso: str,
        expires_at: str,
        ttl_s: float,
        impact: Any = None,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        """Store ``prepared`` as a pending change request and record the proposal in the change history
        (target ``change-requests/<id>``, no version bump); prunes old closed requests. Returns the
        stored record."""
        request_id = new_request_id(now)
        record: dict[str, Any] = {
            "id": request_id,
            "status": "pending",
            "proposed_by": proposed_by,
            "created_at": now_iso,
            "expires_at": expires_at,
            "expires_at_s": now + ttl_s,
            "effect": prepared.effect,
            "change": dict(change),
            "impact": impact,
            "before": prepared.before,
            "after": prepared.after,
            "policy_version": prepared.version,
            "generation": prepared.generation,
            "guard": dict(prepared.guard),
            "target": target,
            "import_whole": prepared.import_whole,
        }
        if warnings:
            record["warnings"] = list(warnings)
        history = {
            "actor": proposed_by,
            "time": now_iso,
            "target": f"change-requests/{request_id}",
            "before": prepared.before,
            "after": prepared.after,
            "version": prepared.version,
            "effect": prepared.effect,
            "change_request": request_id,
            "status": "pending",
            "proposed_target": target,
        }
        ops = orjson.dumps([op_to_json(op) for op in prepared.ops])

        async def run() -> None:
            stale = await self._prunable(now)
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(CHANGE_REQUESTS_KEY, request_id, orjson.dumps(record))
            pipe.hset(CHANGE_OPS_KEY, request_id, ops)
            pipe.zadd(CHANGE_RETIRE_KEY, {request_id: now + ttl_s})
            pipe.xadd(CHANGES_KEY, {"c": orjson.dumps(history)}, maxlen=CHANGES_MAXLEN, approximate=True)
            if stale:
                pipe.hdel(CHANGE_REQUESTS_KEY, *stale)
                pipe.hdel(CHANGE_OPS_KEY, *stale)
                pipe.zrem(CHANGE_RETIRE_KEY, *stale)
            await pipe.execute()

        await self._bounded("change-request", run(), self.load_timeout_s)
        return record

    async def _prunable(self, now: float) -> list[str]:
        """Requests closed (or expired) more than the keep period ago, and beyond the count bound the
        oldest closed ones; a pending request is never pruned before it expires."""
        old = await self.client.zrangebyscore(CHANGE_RETIRE_KEY, "-inf", now - CHANGE_REQUESTS_KEEP_S)
        excess = await self.client.zcard(CHANGE_RETIRE_KEY) - len(old) + 1 - CHANGE_REQUESTS_MAX
        extra = (
            await self.client.zrangebyscore(CHANGE_RETIRE_KEY, "-inf", now, start=len(old), num=excess)
            if excess > 0
            else []
        )
        return [raw.decode() for raw in [*old, *extra]]

    async def change_requests(self, *, status: str | None, limit: int, now: float) -> list[dict[str, Any]]:
        """Requests newest first, as the API shows them; ``status`` filters by status as of ``now``."""
        raw = await self._bounded("change-request", self.client.hgetall(CHANGE_REQUESTS_KEY), self.load_timeout_s)
        shown = [public_request(orjson.loads(value), now) for value in raw.values()]
        if status is not None:
            shown = [item for item in shown if item["status"] == status]
        shown.sort(key=lambda item: (item.get("created_at", ""), item["id"]), reverse=True)
        return shown[:limit]

    async def change_request(self, request_id: str, *, now: float, with_ops: bool = False) -> dict[str, Any]:
        """One request as the API shows it (with its stored operations when ``with_ops``)."""

        async def load() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hget(CHANGE_REQUESTS_KEY, request_id)
            pipe.hget(CHANGE_OPS_KEY, request_id)
            return list(await pipe.execute())

        raw, raw_ops = await self._bounded("change-request", load(), self.load_timeout_s)
        if raw is None:
            raise ChangeRequestMissing(request_id)
        shown = public_request(orjson.loads(raw), now)
        if with_ops:
            shown["ops"] = orjson.loads(raw_ops) if raw_ops else None
        return shown

    async def reject_change(
        self, request_id: str, *, rejected_by: str, reason: str | None, now: float, now_iso: str
    ) -> dict[str, Any]:
        """Close a pending request unapplied (its proposer may withdraw it) and record that in the change
        history; ChangeClosed/ChangeExpired when it is no longer pending."""
        for _attempt in range(100):
            try:
                return await self._bounded(  # type: ignore[no-any-return]
                    "change-request",
                    self._reject_once(request_id, rejected_by=rejected_by, reason=reason, now=now, now_iso=now_iso),
                    self.load_timeout_s,
                )
            except WatchError:
                continue
        raise StoreUnavailable("redis change request: too many concurrent changes")

    async def _reject_once(
        self, request_id: str, *, rejected_by: str, reason: str | None, now: float, now_iso: str
    ) -> dict[str, Any]:
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(CHANGE_REQUESTS_KEY)
            raw = await pipe.hget(CHANGE_REQUESTS_KEY, request_id)
            if raw is None:
                raise ChangeRequestMissing(request_id)
            record = orjson.loads(raw)
            status = request_status(record, now)
            if status == "expired":
                raise ChangeExpired(request_id)
            if status != "pending":
                raise ChangeClosed(request_id, status)
            closed = {**record, "status": "rejected", "rejected_by": rejected_by, "closed_at": now_iso}
            if reason is not None:
                closed["reason"] = reason
            history = {
                "actor": rejected_by,
                "time": now_iso,
                "target": f"change-requests/{request_id}",
                "before": None,
                "after": None,
                "version": record.get("policy_version"),
                "effect": record.get("effect"),
                "change_request": request_id,
                "status": "rejected",
                "proposed_by": record.get("proposed_by"),
                "rejected_by": rejected_by,
                **({"reason": reason} if reason is not None else {}),
            }
            pipe.multi()
            pipe.hset(CHANGE_REQUESTS_KEY, request_id, orjson.dumps(closed))
            pipe.zadd(CHANGE_RETIRE_KEY, {request_id: now})
            pipe.xadd(CHANGES_KEY, {"c": orjson.dumps(history)}, maxlen=CHANGES_MAXLEN, approximate=True)
            await pipe.execute()
            return closed
