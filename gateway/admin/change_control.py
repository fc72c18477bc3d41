"""Committing admin writes under the two-person rule, change requests, and the impact preview.

A planned write (write_plans.py) is committed here: applied at once, or, when its effect (loosen or
tighten) is one ``admin.approval.required_for`` names, held as a change request that changes
nothing until another admin approves it. Approval applies exactly the operations stored at
proposal, in one transaction with the version bump, refused as ``change_conflict`` when anything it
touches changed since. ``POST /admin/v1/impact`` resolves a described change dry and hands its
operations to the impact previewer the context carries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..errors import GatewayError, invalid, json_response
from ..policy.effect import SCREENING_RECORD
from ..policy.names import now_iso
from ..storage.change_requests import public_request
from ..storage.ops import ApprovalRequired, Change, PlainOp, PreparedWrite
from .auth import ACTOR_KEY
from .context import AdminContext
from .inputs import json_object, limit_of, optional_text, parse_json
from .write_plans import WriteCall, WritePlan, WritePlanner

log = logging.getLogger("gateway.admin")

STATUSES = ("pending", "applied", "rejected", "expired")
# The longest look-back an impact preview may ask for (the audit trail kept in Redis is shorter).
MAX_IMPACT_HOURS = 24 * 366


def iso_at(epoch: float) -> str:
    """``epoch`` as the ISO-8601 UTC form every admin timestamp uses."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def impact_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "impact_unavailable",
        "No impact preview is available on this gateway; the change was checked and nothing was written.",
    )


class ChangeControl:
    """The write path of the admin API: commit or hold a plan; list, approve and reject change requests."""

    def __init__(
        self,
        context: AdminContext,
        planner: WritePlanner,
        catch_up: Callable[[int], Awaitable[None]],
        *,
        rescreen: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        self.context = context
        self.store = context.store
        self.planner = planner
        self._catch_up = catch_up
        # Screens every API key and partner again once a new screening list is live; how many hits are new.
        self._rescreen = rescreen

    async def _applied(self, version: int, change: Change) -> int | None:
        """After a write is applied (at once or approved): load it here, and when it replaced the
        screening list, screen the keys and partners again (new hits, else None)."""
        await self._catch_up(version)
        if self._rescreen is None or SCREENING_RECORD not in (change.after or {}):
            return None
        return await self._rescreen(version)

    # --- writes ---------------------------------------------------------------------------------

    async def commit(self, call: WriteCall, plan: WritePlan) -> web.Response:
        """Write ``plan`` now, or hold it as a change request (202) when its effect needs approval."""
        approval = self.context.admin.approval
        try:
            version, _change = await self.store.write(
                plan.ops,
                actor=call.actor,
                now_iso=now_iso(),
                target=plan.target,
                import_whole=plan.import_whole,
                unknown_model=self.context.rules.unknown_model,  # whether a model leaving the registry loosens
                hold_for=approval.required_for,
            )
        except ApprovalRequired as held:
            return await self._hold(call, plan, held.prepared)
        hits = await self._applied(version, _change)
        answer = {"version": version, **plan.fields()}
        if hits is not None and plan.target == SCREENING_RECORD:
            answer["new_hits"] = hits
        return json_response(answer)

    async def _hold(self, call: WriteCall, plan: WritePlan, prepared: PreparedWrite) -> web.Response:
        ttl_s = self.context.admin.approval.ttl_s
        warnings = plan.fields().get("warnings")
        impact = await self._impact_or_none(prepared.ops)
        now = time.time()
        record = await self.store.propose_change(
            prepared,
            proposed_by=call.actor,
            change=call.describe(),
            target=plan.target,
            now=now,
            now_iso=iso_at(now),
            expires_at=iso_at(now + ttl_s),
            ttl_s=ttl_s,
            impact=impact,
            warnings=warnings,
        )
        log.info("change request %s proposed by %s (%s)", record["id"], call.actor, prepared.effect)
        return json_response({"change_request": public_request(record, now), **plan.held_fields}, status=202)

    async def _impact_or_none(self, ops: Sequence[PlainOp]) -> dict[str, Any] | None:
        """A change request's impact: None when no previewer is wired or it fails (the request stands)."""
        previewer = self.context.impact
        if previewer is None:
            return None
        settings = self.context.admin.impact
        try:
            return await asyncio.wait_for(previewer.preview(ops, settings.hours), settings.timeout_s)
        except Exception as exc:  # a preview is advice: its failure never blocks a proposal
            log.warning("impact preview failed: %s: %s", type(exc).__name__, exc)
            return None

    # --- change requests ------------------------------------------------------------------------

    async def list_requests(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status is not None and status not in STATUSES:
            raise invalid("status", f"must be one of {', '.join(STATUSES)}")
        limit = limit_of(request.query.get("limit"))
        found = await self.store.change_requests(status=status, limit=limit, now=time.time())
        return json_response({"change_requests": found})

    async def get_request(self, request: web.Request) -> web.Response:
        found = await self.store.change_request(request.match_info["id"], now=time.time(), with_ops=True)
        return json_response({"change_request": found})

    async def approve(self, request: web.Request) -> web.Response:
        await _optional_body(request, ())
        return json_response(await self.approve_request(request.match_info["id"], request[ACTOR_KEY]))

    async def approve_request(self, request_id: str, approver: str) -> dict[str, Any]:
        """Apply a pending change request as ``approver``: ``{"version", "change_request"}``."""
        now = time.time()
        version, change, closed = await self.store.apply_change_request(
            request_id,
            approver=approver,
            now_iso=iso_at(now),
            now=now,
            unknown_model=self.context.rules.unknown_model,
        )
        await self._applied(version, change)
        return {"version": version, "change_request": public_request(closed, now)}

    async def reject(self, request: web.Request) -> web.Response:
        body = await _optional_body(request, ("reason",))
        answer = await self.reject_request(request.match_info["id"], request[ACTOR_KEY], body.get("reason"))
        return json_response(answer)

    async def reject_request(self, request_id: str, rejecter: str, reason: Any) -> dict[str, Any]:
        """Close a pending change request unapplied: ``{"change_request"}``."""
        text = optional_text(reason, "reason", 1000)
        now = time.time()
        closed = await self.store.reject_change(
            request_id, rejected_by=rejecter, reason=text, now=now, now_iso=iso_at(now)
        )
        return {"change_request": public_request(closed, now)}

    # --- impact preview -------------------------------------------------------------------------

    async def impact(self, request: web.Request) -> web.Response:
        """Resolve the described change dry, as its write would, and preview its impact."""
        body = json_object(parse_json(await request.read()), ("change", "hours"))
        if "change" not in body:
            raise invalid("change", 'is required: {"method", "path", "body"} of an admin write')
        hours = body.get("hours", self.context.admin.impact.hours)
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= MAX_IMPACT_HOURS:
            raise invalid("hours", f"must be a number above 0 and at most {MAX_IMPACT_HOURS}")
        call, planner = self.planner.call_of(body["change"], request[ACTOR_KEY])
        plan = await planner(call)
        prepared = await self.store.prepare(
            plan.ops, import_whole=plan.import_whole, unknown_model=self.context.rules.unknown_model
        )
        previewer = self.context.impact
        if previewer is None:
            raise impact_unavailable()
        settings = self.context.admin.impact
        try:
            result = await asyncio.wait_for(previewer.preview(prepared.ops, float(hours)), settings.timeout_s)
        except TimeoutError:
            raise GatewayError(
                503, "impact_timeout", f"The impact preview took longer than {settings.timeout_s:g} s."
            ) from None
        return json_response({**result, "effect": prepared.effect, "version": prepared.version})


async def _optional_body(request: web.Request, allowed: Sequence[str]) -> dict[str, Any]:
    """An optional JSON object body (empty is ``{}``), its fields among ``allowed``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    return dict(json_object(parse_json(raw), allowed))
