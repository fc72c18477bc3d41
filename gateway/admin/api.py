"""The operator API on the admin listener (docs/contract.md §7): its handlers and routes, one write path.

Every write is planned (write_plans.py: validated and turned into operations,
from method, path, query, body and actor) and committed (change_control.py):
one :meth:`Store.write` (data, version bump and change record in one
transaction) -> publish, then this process's snapshot is refreshed so the
operator's next call already sees the change; or, under the two-person rule,
held as a change request that another admin approves. Reads of the
policy go to Redis, the authority; ``decide`` and screening searches use the
snapshot the public listener enforces.

Token auth is auth.py's middleware and every failure becomes a contract error body in
error_middleware.py; the handlers get an :class:`AdminContext`, never the whole runtime.

Operators' everyday commands must not reopen access by accident, so: PATCH
(RFC 7396 merge patch) changes only the fields it names, merged and validated
against the stored value inside the write's transaction; an ``expires_at`` in
the past is refused; a restore into an empty Redis must carry every part; a
revoked API key is never written back; risky but valid writes answer with
``warnings``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..errors import (
    invalid,
    json_response,
    key_revoked,
    not_found,
    policy_incomplete,
    policy_missing,
    screening_match,
)
from ..policy.decide import differs
from ..policy.names import LIST_NAMES, PARTNERS, now_iso
from ..policy.validate import (
    missing_parts,
    policy_diff,
    validate_model_name,
)
from ..policy.wire import model_schedule
from ..screening import ScreeningIndex, rescreen
from ..storage.clients import StoreUnavailable
from ..storage.keys import APIKEYS_KEY, APIKEYS_PART, MODELS_KEY, list_key
from ..storage.ops import (
    KeyRevoked,
)
from .audit_filters import audit_filter
from .auth import ACTOR_KEY, token_middleware
from .change_control import ChangeControl
from .context import ADMIN_CONTEXT_KEY, AdminContext
from .error_middleware import error_middleware
from .inputs import (
    IMPORT_SECTIONS,
    decide_request,
    list_name,
    parse_min_score,
    query_limit,
    read_json,
    sorted_by_key,
)
from .openapi import openapi_document
from .write_plans import PREFIX, Planner, WriteCall, WritePlanner

log = logging.getLogger("gateway.admin")

# The search name travels in the query string; 500 characters, percent-encoded, stay inside
# the request-line limit of the HTTP parser.
MAX_SEARCH_CHARS = 500
ANY_TEXT = r"[\s\S]+"


class AdminApi:
    """Handlers for ``/admin/v1``, given the store, the enforced policy and the static rules they use."""

    def __init__(self, context: AdminContext) -> None:
        self.context = context
        self.store = context.store
        self.policy = context.policy
        self.tiers = context.tiers
        self._refresh_lock = asyncio.Lock()
        self._openapi = orjson.dumps(openapi_document(tiers=self.tiers))
        self.planner = WritePlanner(
            tiers=self.tiers,
            rules=context.rules,
            snapshot=lambda: self.policy.snapshot,
            screen_key=self._screen_key,
        )
        self.changes_control = ChangeControl(context, self.planner, self._catch_up, rescreen=self._rescreen)

    # the write path: plan (write_plans.py), then commit or hold for approval (change_control.py)

    def writer(self, planner: Planner) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of one write route: the request as a :class:`WriteCall`, planned, committed."""

        async def handle(request: web.Request) -> web.Response:
            call = WriteCall(
                method=request.method,
                path=request.raw_path,
                params=dict(request.match_info),
                query=dict(request.query),
                body=await request.read(),
                actor=request[ACTOR_KEY],
                content_type=request.headers.get("Content-Type"),
            )
            return await self.changes_control.commit(call, await planner(call))

        return handle

    async def _catch_up(self, version: int) -> None:
        """Load the version just written into this process's snapshot before answering."""
        policy = self.policy
        try:
            async with self._refresh_lock:
                for _attempt in range(3):
                    await policy.refresh()
                    if policy.version >= version:
                        return
        except StoreUnavailable as exc:
            # The write landed; the poll picks the version up once Redis answers again.
            log.warning("written version %s not yet loaded: %s", version, exc)
        except Exception:
            log.exception("written version %s could not be loaded", version)

    async def _read_hash(self, key: str) -> tuple[int, dict[str, dict[str, Any]]]:
        found = await self.store.read_hash(key)
        if found is None:
            raise policy_missing(read=True)
        return found

    # policy

    async def get_policy(self, _request: web.Request) -> web.Response:
        found = await self.store.load_document()
        if found is None:
            raise policy_missing(read=True)
        data, screening = found
        # Every section, an empty one as empty, so an export restores a Redis that holds nothing.
        return json_response(
            {
                "version": data.version,
                "lists": {name: sorted_by_key(data.lists[name]) for name in LIST_NAMES},
                "models": sorted_by_key(data.models),
                "api_keys": sorted_by_key(data.api_keys),
                "screening": {"entries": screening},
                "revoked_api_keys": sorted_by_key(data.revoked),
            }
        )

    async def diff_policy(self, request: web.Request) -> web.Response:
        """What ``PUT /admin/v1/policy`` with this body would change, per section; changes nothing.

        It refuses what the import would refuse (an incomplete restore, a revoked key written back),
        judged against the policy as read now; the import decides again when it runs.
        """
        call = WriteCall(
            method="PUT",
            path=f"{PREFIX}/policy",
            params={},
            query=dict(request.query),
            body=await request.read(),
            actor=request[ACTOR_KEY],
        )
        validated, sections, warnings = await self.planner.import_document(call)
        found = await self.store.load_document()
        current: dict[str, Any] = {}
        if found is None:
            missing = missing_parts(validated)
            if missing:
                raise policy_incomplete(missing)
            chosen = validated
            version = None
        else:
            data, screening = found
            current = {
                "lists": data.lists,
                "models": data.models,
                "api_keys": data.api_keys,
                "screening": {"entries": screening},
                "revoked_api_keys": data.revoked,
            }
            named = sections if sections is not None else frozenset(IMPORT_SECTIONS) - {"api_keys"}
            chosen = {k: v for k, v in validated.items() if k in named or k == "revoked_api_keys"}
            version = data.version
        revoked = {**current.get("revoked_api_keys", {}), **validated.get("revoked_api_keys", {})}
        by_hash = {record.get("hash"): key_id for key_id, record in revoked.items()}
        for key_id, record in (chosen.get("api_keys") or {}).items():
            hit = key_id if key_id in revoked else by_hash.get(record.get("hash"))
            if hit is not None:
                raise key_revoked(KeyRevoked(hit, revoked[hit]))
        answer: dict[str, Any] = {
            "version": version,
            "restore": found is None,
            "sections": policy_diff(current, chosen),
        }
        if warnings:
            answer["warnings"] = warnings
        return json_response(answer)

    # lists

    async def get_list(self, request: web.Request) -> web.Response:
        name = list_name(request)
        version, entries = await self._read_hash(list_key(name))
        return json_response({"version": version, "list": name, "entries": sorted_by_key(entries)})

    # models

    async def list_models(self, _request: web.Request) -> web.Response:
        version, models = await self._read_hash(MODELS_KEY)
        return json_response({"version": version, "models": sorted_by_key(models)})

    async def get_model(self, request: web.Request) -> web.Response:
        name = validate_model_name(request.match_info["model"])
        version, models = await self._read_hash(MODELS_KEY)
        if name not in models:
            raise not_found(f"No model {name[:80]!r} in the registry.")
        answer: dict[str, Any] = {"version": version, "name": name, "model": models[name]}
        answer.update(model_schedule(name, models[name], self.policy.snapshot, time.time()))
        return json_response(answer)

    # API keys

    async def list_keys(self, _request: web.Request) -> web.Response:
        version, keys = await self._read_hash(APIKEYS_KEY)
        return json_response({"version": version, "api_keys": sorted_by_key(keys)})

    async def _screen_key(self, attributes: dict[str, Any]) -> list[str]:
        """Screen a key's ``org_name`` and ``org`` before it is issued: a match is 409 ``screening_match``
        (nothing issued), a review-band score a warning."""
        index, _version = await self._screening_index()
        if index is None:
            return []
        warnings = []
        for field in ("org_name", "org"):
            name = attributes.get(field)
            hit = index.match(name) if isinstance(name, str) and name else None
            if hit is None or not isinstance(name, str):
                continue
            if hit.blocked:
                raise screening_match(field)
            warnings.append(
                f"{field}: {name[:80]!r} is in the screening review band (score {hit.score:.2f} against "
                f"{hit.name!r}, {hit.source}); review it before the key is used"
            )
        return warnings

    # decisions

    async def decide(self, request: web.Request) -> web.Response:
        return json_response(self.decide_answer(await read_json(request)))

    def decide_answer(self, body: Any) -> dict[str, Any]:
        """What the gateway would decide now for the caller ``body`` describes (the console's form too)."""
        admission, policy = self.context.admission, self.policy
        if isinstance(body, dict):
            body = dict(body)
        explain = body.pop("explain", "first") if isinstance(body, dict) else "first"
        if explain not in ("first", "all"):
            raise invalid(
                "explain", 'must be "first" (the default: the rule that decides) or "all" (every rule that blocks)'
            )
        identity, ip, model = decide_request(body, self.tiers)
        snapshot = policy.snapshot
        # The public path's steps; a stale policy is answered as its decision would be, not refused.
        caller = admission.caller(identity, ip, snapshot)
        decision = admission.decide(snapshot, caller, model, stale=policy.stale())
        answer = decision.to_dict()
        if answer.get("screening") is None:
            answer.pop("screening", None)
        answer["ip_country"] = caller.ip_subdivision or caller.ip_country
        if explain == "all":
            blocking = admission.explain(snapshot, caller, model, stale=policy.stale())
            answer["blocking"] = [
                {name: found.to_dict()[name] for name in ("status", "code", "message")} for found in blocking
            ]
        shadow = snapshot.shadow if snapshot is not None else None
        if shadow is not None and not policy.stale():
            # What the shadow entries would decide, when it differs from what is enforced.
            shadow_decision = admission.decide(shadow, admission.caller(identity, ip, shadow), model)
            if differs(decision, shadow_decision):
                answer["shadow"] = {
                    name: shadow_decision.to_dict()[name] for name in ("decision", "status", "code", "message")
                }
        return answer

    # screening

    async def _rescreen(self, version: int) -> int:
        """Screen every API key's and partner's names against the list just imported and keep the hits
        for ``GET /admin/v1/screening/hits``; returns how many are new. Rule 2 blocks them already:
        each request screens its caller's names against the same list."""
        found = await self.store.load_parts((APIKEYS_PART, PARTNERS))
        if found is None:
            return 0
        index, _ = await self._screening_index()
        previous = await self.store.read_screening_hits() or {}
        document = rescreen(index, found.api_keys, found.lists.get(PARTNERS, {}), previous, version, now_iso())
        await self.store.write_screening_hits(document)
        return sum(1 for hit in document["hits"] if hit["new"])

    async def screening_hits(self, request: web.Request) -> web.Response:
        document = await self.store.read_screening_hits() or {"version": None, "screened_at": None, "hits": []}
        only_new = request.query.get("new", "false")
        if only_new not in ("true", "false", "1", "0"):
            raise invalid("new", "must be true or false")
        if only_new in ("1", "true"):
            document = {**document, "hits": [hit for hit in document["hits"] if hit.get("new")]}
        return json_response(document)

    async def search_screening(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        if not name.strip():
            raise invalid("name", "is required: the name to screen")
        if len(name) > MAX_SEARCH_CHARS:
            raise invalid("name", f"must be at most {MAX_SEARCH_CHARS} characters")
        limit = query_limit(request) if "limit" in request.query else 10
        min_score = parse_min_score(request.query.get("min_score"))
        return json_response(await self.screening_answer(name, limit, min_score))

    async def screening_answer(self, name: str, limit: int, min_score: float) -> dict[str, Any]:
        """The scored matches of ``name`` in the screening list the public listener screens with."""
        index, version = await self._screening_index()
        hits = index.search(name, limit=limit, min_score=min_score) if index is not None else []
        cfg = self.context.screening
        return {
            "version": version,
            "name": name,
            "block_threshold": cfg.block_threshold,
            "review_threshold": cfg.review_threshold,
            "matches": [hit.to_dict() for hit in hits],
        }

    async def _screening_index(self) -> tuple[ScreeningIndex | None, int]:
        snapshot = self.policy.snapshot
        if snapshot is not None and (snapshot.screening is None or isinstance(snapshot.screening, ScreeningIndex)):
            # The index the public listener screens with, so a search shows what a request would meet.
            return snapshot.screening, snapshot.version
        found = await self.store.load_document()
        if found is None:
            raise policy_missing(read=True)
        data, entries = found
        cfg = self.context.screening
        if not entries:
            return None, data.version
        index = await asyncio.to_thread(
            ScreeningIndex,
            entries,
            block_threshold=cfg.block_threshold,
            review_threshold=cfg.review_threshold,
            cache_size=0,
        )
        return index, data.version

    # history

    async def audit(self, request: web.Request) -> web.Response:
        limit, match = query_limit(request), audit_filter(request)
        if not match.fields and match.since is None and match.until is None:
            return json_response({"records": await self.store.read_audit(limit)})
        page = await self.store.search_audit(limit, match, since_ms=match.since_ms, until_ms=match.until_ms)
        return json_response({"records": page.records, "scanned": page.scanned, "complete": page.complete})

    async def changes(self, request: web.Request) -> web.Response:
        return json_response({"changes": await self.store.read_changes(query_limit(request))})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def register_admin_routes(app: web.Application, context: AdminContext) -> AdminApi:
    """Mount ``/admin/v1`` on the admin listener, behind the error and token middlewares; ``context`` is
    kept under :data:`ADMIN_CONTEXT_KEY`. The handlers' object is returned for the console to share."""
    app[ADMIN_CONTEXT_KEY] = context
    api = AdminApi(context)
    plan = api.planner
    app.middlewares.extend(
        [error_middleware(lambda: context.policy.version), token_middleware(context.admin, context.environ)]
    )
    routes = app.router
    routes.add_get(f"{PREFIX}/openapi.json", api.openapi)
    routes.add_get(f"{PREFIX}/policy", api.get_policy)
    routes.add_put(f"{PREFIX}/policy", api.writer(plan.put_policy))
    routes.add_post(f"{PREFIX}/policy/diff", api.diff_policy)
    routes.add_get(f"{PREFIX}/lists/{{list}}", api.get_list)
    routes.add_put(f"{PREFIX}/lists/{{list}}", api.writer(plan.replace_list))
    # ANY_TEXT also takes an unencoded "/" of a CIDR (the encoded form arrives decoded as well),
    # and a decoded control character, so the validator names it instead of the router missing it.
    # An empty key matches too, so it is refused naming the key rather than as an unknown path.
    entry_path = f"{PREFIX}/lists/{{list}}/{{key:{ANY_TEXT[:-1]}*}}"
    routes.add_put(entry_path, api.writer(plan.put_entry))
    routes.add_patch(entry_path, api.writer(plan.patch_entry))
    routes.add_delete(entry_path, api.writer(plan.delete_entry))
    routes.add_get(f"{PREFIX}/models", api.list_models)
    routes.add_get(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.get_model)
    routes.add_put(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.writer(plan.put_model))
    routes.add_patch(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.writer(plan.patch_model))
    routes.add_delete(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.writer(plan.delete_model))
    routes.add_get(f"{PREFIX}/api-keys", api.list_keys)
    routes.add_post(f"{PREFIX}/api-keys", api.writer(plan.create_key))
    routes.add_delete(f"{PREFIX}/api-keys/{{id}}", api.writer(plan.revoke_key))
    routes.add_post(f"{PREFIX}/decide", api.decide)
    routes.add_post(f"{PREFIX}/screening/import", api.writer(plan.import_screening))
    routes.add_get(f"{PREFIX}/screening/search", api.search_screening)
    routes.add_get(f"{PREFIX}/screening/hits", api.screening_hits)
    routes.add_get(f"{PREFIX}/audit", api.audit)
    routes.add_get(f"{PREFIX}/changes", api.changes)
    control = api.changes_control
    routes.add_get(f"{PREFIX}/change-requests", control.list_requests)
    routes.add_get(f"{PREFIX}/change-requests/{{id}}", control.get_request)
    routes.add_post(f"{PREFIX}/change-requests/{{id}}/approve", control.approve)
    routes.add_post(f"{PREFIX}/change-requests/{{id}}/reject", control.reject)
    routes.add_post(f"{PREFIX}/impact", control.impact)
    return api
