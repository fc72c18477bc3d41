"""The operator API on the admin listener (docs/contract.md §7): its handlers and routes, one write path.

Every write runs validate -> one :meth:`Store.write` (data, version bump and
change record in one transaction) -> publish, then refreshes this process's
snapshot so the operator's next call already sees the change. Reads of the
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
import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

import orjson
from aiohttp import web

from ..errors import (
    GatewayError,
    invalid,
    json_response,
    key_revoked,
    not_found,
    policy_incomplete,
    policy_missing,
    screening_match,
)
from ..identity import hash_api_key, new_api_key
from ..policy.decide import differs
from ..policy.names import COUNTRY_GROUPS, DENY_COUNTRIES, GROUP_PREFIX, LICENCES, LIST_NAMES, PARTNERS, now_iso
from ..policy.validate import document_references as _document_references
from ..policy.validate import (
    document_warnings,
    drop_expired,
    entry_warnings,
    merge_patch,
    missing_parts,
    model_warnings,
    model_write,
    patch_body,
    policy_diff,
    validate_api_key_request,
    validate_entry,
    validate_list,
    validate_model_name,
    validate_policy_document,
)
from ..policy.wire import model_schedule, references_view
from ..screening import ScreeningIndex, parse_csl, rescreen
from ..storage.clients import StoreUnavailable
from ..storage.keys import APIKEYS_KEY, APIKEYS_PART, MODELS_KEY, list_key
from ..storage.ops import (
    HashDelete,
    HashReplace,
    HashSet,
    HashUpdate,
    KeyRevoke,
    KeyRevoked,
    OpsPlan,
    ScreeningReplace,
)
from .auth import ACTOR_KEY, token_middleware
from .context import ADMIN_CONTEXT_KEY, AdminContext
from .error_middleware import error_middleware
from .inputs import (
    IMPORT_SECTIONS,
    decide_request,
    entry_key,
    import_plan,
    import_sections,
    json_object,
    list_name,
    no_meta,
    parse_min_score,
    query_limit,
    read_json,
    screening_section,
    sorted_by_key,
)
from .openapi import openapi_document

log = logging.getLogger("gateway.admin")

PREFIX = "/admin/v1"
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

    # the write path

    async def _write(self, request: web.Request, ops: OpsPlan, target: str, *, import_whole: bool = False) -> int:
        version, _change = await self.store.write(
            ops,
            actor=request[ACTOR_KEY],
            now_iso=now_iso(),
            target=target,
            import_whole=import_whole,
            unknown_model=self.context.rules.unknown_model,  # whether a model leaving the registry loosens
        )
        await self._catch_up(version)
        return version

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

    def _home_countries(self) -> frozenset[str]:
        return self.context.rules.home_countries

    def _partners(self) -> Collection[str]:
        """The partners the enforced snapshot holds (for the deny-entities warning)."""
        snapshot = self.policy.snapshot
        return snapshot.lists[PARTNERS] if snapshot is not None else ()

    def _entry_warnings(self, name: str, keys: Collection[str]) -> list[str]:
        home, partners = self._home_countries(), self._partners()
        return [
            warning for key in keys for warning in entry_warnings(name, key, home_countries=home, partners=partners)
        ]

    def _check_references(
        self, *, lists: dict[str, dict[str, Any] | None] | None = None, models: dict[str, Any] | None = None
    ) -> None:
        """Refuse a write that would leave a ``@GROUP`` naming no group, or a licence naming a model the
        registry lacks, judged against this process's snapshot with the write applied. ``lists``: list ->
        {key: entry or None (deleted)}; ``models``: name -> model or None."""
        view = references_view(self.policy.snapshot)
        held = view.setdefault("lists", {})
        for name, changes in (lists or {}).items():
            if name not in (COUNTRY_GROUPS, DENY_COUNTRIES, LICENCES) or changes is None:
                continue
            part = held.setdefault(name, {})
            for key, value in changes.items():
                if value is None:
                    part.pop(key, None)
                elif name != DENY_COUNTRIES or key[:1] == GROUP_PREFIX:
                    part[key] = value
        stored = view.setdefault("models", {})
        for name, model in (models or {}).items():
            if model is None:
                stored.pop(name, None)
            else:
                stored[name] = model
        _document_references({}, view)

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

    async def _import_document(self, request: web.Request) -> tuple[dict[str, Any], frozenset[str] | None, list[str]]:
        """A policy import's body, validated and normalised, its ``?sections=`` and its warnings."""
        sections = import_sections(request.query.get("sections"))
        body = await read_json(request)
        version = body.get("version") if isinstance(body, dict) else None
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise invalid("version", "must be a whole number (it is ignored on PUT)")
        validated = validate_policy_document(body, actor=request[ACTOR_KEY], now_iso=now_iso(), tiers=self.tiers)
        if sections is not None:
            for name in sections:
                if name not in validated:
                    raise invalid("sections", f"names {name}, which the document does not carry")
        validated, warnings = drop_expired(validated, time.time())
        _document_references(validated, references_view(self.policy.snapshot))
        warnings += document_warnings(validated, home_countries=self._home_countries(), partners=self._partners())
        if "screening" in validated:
            entries = await screening_section(validated["screening"])
            validated["screening"] = {"entries": entries}
        return validated, sections, warnings

    async def put_policy(self, request: web.Request) -> web.Response:
        validated, sections, warnings = await self._import_document(request)
        skipped: list[str] = []
        plan = import_plan(validated, sections, skipped)
        # Into a Redis with no policy this is the restore that starts a new generation.
        version = await self._write(request, plan, "policy", import_whole=True)
        if "screening" in validated:
            await self._rescreen(version)
        warnings += [
            f"{name}: not imported; the live {name} are kept (name the section with ?sections= to replace it)"
            for name in skipped
        ]
        return _written(version, warnings)

    async def diff_policy(self, request: web.Request) -> web.Response:
        """What ``PUT /admin/v1/policy`` with this body would change, per section; changes nothing.

        It refuses what the import would refuse (an incomplete restore, a revoked key written back),
        judged against the policy as read now; the import decides again when it runs.
        """
        validated, sections, warnings = await self._import_document(request)
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

    async def put_entry(self, request: web.Request) -> web.Response:
        name = list_name(request)
        key = entry_key(request, name)
        body = await read_json(request)
        no_meta(body)
        entry = validate_entry(name, key, body, actor=request[ACTOR_KEY], now_iso=now_iso(), now=time.time())
        self._check_references(lists={name: {key: entry}})
        version = await self._write(request, [HashSet(list_key(name), key, entry)], f"lists/{name}/{key}")
        return _written(version, self._entry_warnings(name, [key]), list=name, key=key)

    async def patch_entry(self, request: web.Request) -> web.Response:
        """Merge patch of one entry: fields left out keep their stored values (docs/contract.md §7)."""
        name = list_name(request)
        key = entry_key(request, name)
        patch = patch_body(await read_json(request))
        no_meta(patch)
        actor, stamp, now = request[ACTOR_KEY], now_iso(), time.time()

        def update(stored: dict[str, Any] | None) -> dict[str, Any]:
            if stored is None:
                raise GatewayError(
                    404,
                    "not_found",
                    f"No entry {key!r} in {name} to patch; create it with PUT /admin/v1/lists/{name}/{{key}}.",
                )
            merged = merge_patch({k: v for k, v in stored.items() if k not in ("added_by", "added_at")}, patch)
            # Validated whole, as PUT would be; added_by/added_at record this change.
            entry = validate_entry(name, key, merged, actor=actor, now_iso=stamp, now=now)
            self._check_references(lists={name: {key: entry}})
            return entry

        version = await self._write(request, [HashUpdate(list_key(name), key, update)], f"lists/{name}/{key}")
        return _written(version, self._entry_warnings(name, [key]), list=name, key=key)

    async def delete_entry(self, request: web.Request) -> web.Response:
        name = list_name(request)
        key = entry_key(request, name)
        self._check_references(lists={name: {key: None}})
        version = await self._write(request, [HashDelete(list_key(name), key)], f"lists/{name}/{key}")
        return json_response({"version": version, "list": name, "key": key})

    async def replace_list(self, request: web.Request) -> web.Response:
        name = list_name(request)
        body = json_object(await read_json(request), ("entries", "allow_empty"))
        if "entries" not in body:
            raise invalid("entries", "is required: an object of key: entry")
        allow_empty = body.get("allow_empty", False)
        if not isinstance(allow_empty, bool):
            raise invalid("allow_empty", "must be true or false")
        entries = validate_list(name, body["entries"], actor=request[ACTOR_KEY], now_iso=now_iso(), now=time.time())
        if not entries and not allow_empty:
            raise invalid("entries", 'is empty; emptying a list needs "allow_empty": true')
        if name in (COUNTRY_GROUPS, DENY_COUNTRIES, LICENCES):
            self._check_references(lists={name: _replacing(self.policy.snapshot, name, entries)})
        version = await self._write(request, [HashReplace(list_key(name), entries)], f"lists/{name}")
        return _written(version, self._entry_warnings(name, entries), list=name, count=len(entries))

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

    async def put_model(self, request: web.Request) -> web.Response:
        """Replace a model whole: a field left out takes its default (PATCH changes only what it names).
        With ``"enforce": false`` only the model's shadow is written; the live model stays."""
        return await self._write_model(request, patch=False)

    async def patch_model(self, request: web.Request) -> web.Response:
        """Merge patch of a model, applied to the stored value inside the write's transaction: suspending
        a model's export leaves its ``allowed_countries`` as they are. ``"enforce": false`` patches the
        shadow; ``"enforce": true`` promotes it (model_write has the rules)."""
        return await self._write_model(request, patch=True)

    async def _write_model(self, request: web.Request, *, patch: bool) -> web.Response:
        name = validate_model_name(request.match_info["model"])
        body = await read_json(request)
        if patch:
            body = patch_body(body)
        written: dict[str, Any] = {}

        def update(stored: dict[str, Any] | None) -> dict[str, Any]:
            if stored is None and patch:
                raise GatewayError(
                    404,
                    "not_found",
                    f"No model {name[:80]!r} in the registry to patch; add it with PUT /admin/v1/models/{{model}}.",
                )
            written.clear()
            written.update(model_write(name, stored, body, patch=patch))
            self._check_references(models={name: written})
            return written

        if not patch and not (isinstance(body, dict) and body.get("enforce") is False):
            # A plain PUT does not depend on the stored model: checked before the write starts.
            update(None)
        version = await self._write(request, [HashUpdate(MODELS_KEY, name, update)], f"models/{name}")
        return _written(version, model_warnings(name, written), name=name)

    async def delete_model(self, request: web.Request) -> web.Response:
        name = validate_model_name(request.match_info["model"])
        version = await self._write(request, [HashDelete(MODELS_KEY, name)], f"models/{name}")
        return json_response({"version": version, "name": name})

    # API keys

    async def list_keys(self, _request: web.Request) -> web.Response:
        version, keys = await self._read_hash(APIKEYS_KEY)
        return json_response({"version": version, "api_keys": sorted_by_key(keys)})

    async def create_key(self, request: web.Request) -> web.Response:
        attributes = validate_api_key_request(await read_json(request), self.tiers, now=time.time())
        warnings = await self._screen_key(attributes)
        key_id = "key_" + secrets.token_hex(8)
        key = new_api_key()
        # Only the hash is stored; the key itself exists in this one response.
        record = {"hash": hash_api_key(key), **attributes, "created_at": now_iso(), "created_by": request[ACTOR_KEY]}
        version = await self._write(request, [HashSet(APIKEYS_KEY, key_id, record)], f"api-keys/{key_id}")
        return _written(version, warnings, id=key_id, key=key)

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

    async def revoke_key(self, request: web.Request) -> web.Response:
        # The key goes and its revocation (hash, who, when) stays, so no import can bring it back.
        key_id = request.match_info["id"]
        op = KeyRevoke(key_id, revoked_by=request[ACTOR_KEY], revoked_at=now_iso())
        version = await self._write(request, [op], f"api-keys/{key_id}")
        return json_response({"version": version, "id": key_id})

    # decisions

    async def decide(self, request: web.Request) -> web.Response:
        admission, policy = self.context.admission, self.policy
        body = await read_json(request)
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
        return json_response(answer)

    # screening

    async def import_screening(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip():
            raise invalid("body", "a Consolidated Screening List CSV or JSON document is required")
        # Parsing a whole list takes a while: off the loop that also serves the public listener.
        entries = await asyncio.to_thread(parse_csl, raw, content_type=request.headers.get("Content-Type"))
        version = await self._write(request, [ScreeningReplace(entries)], "screening")
        hits = await self._rescreen(version)
        return json_response({"version": version, "entries": len(entries), "new_hits": hits})

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
        index, version = await self._screening_index()
        hits = index.search(name, limit=limit, min_score=min_score) if index is not None else []
        cfg = self.context.screening
        return json_response(
            {
                "version": version,
                "name": name,
                "block_threshold": cfg.block_threshold,
                "review_threshold": cfg.review_threshold,
                "matches": [hit.to_dict() for hit in hits],
            }
        )

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
        return json_response({"records": await self.store.read_audit(query_limit(request))})

    async def changes(self, request: web.Request) -> web.Response:
        return json_response({"changes": await self.store.read_changes(query_limit(request))})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def _replacing(snapshot: Any, name: str, entries: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """A whole-list replace as entry changes: the new entries, and every held one not among them gone."""
    held = (snapshot.shadow or snapshot).lists[name] if snapshot is not None else {}
    changes: dict[str, dict[str, Any] | None] = dict.fromkeys((key for key in held if key not in entries), None)
    changes.update(entries)
    return changes


def _written(version: int, warnings: Sequence[str], **fields: Any) -> web.Response:
    """A write's answer: the new version, what was written and, when any, the risks it carries."""
    answer: dict[str, Any] = {"version": version, **fields}
    if warnings:
        answer["warnings"] = list(warnings)
    return json_response(answer)


def register_admin_routes(app: web.Application, context: AdminContext) -> None:
    """Mount ``/admin/v1`` on the admin listener, behind the error and token middlewares; ``context`` is
    kept under :data:`ADMIN_CONTEXT_KEY`."""
    app[ADMIN_CONTEXT_KEY] = context
    api = AdminApi(context)
    app.middlewares.extend(
        [error_middleware(lambda: context.policy.version), token_middleware(context.admin, context.environ)]
    )
    routes = app.router
    routes.add_get(f"{PREFIX}/openapi.json", api.openapi)
    routes.add_get(f"{PREFIX}/policy", api.get_policy)
    routes.add_put(f"{PREFIX}/policy", api.put_policy)
    routes.add_post(f"{PREFIX}/policy/diff", api.diff_policy)
    routes.add_get(f"{PREFIX}/lists/{{list}}", api.get_list)
    routes.add_put(f"{PREFIX}/lists/{{list}}", api.replace_list)
    # ANY_TEXT also takes an unencoded "/" of a CIDR (the encoded form arrives decoded as well),
    # and a decoded control character, so the validator names it instead of the router missing it.
    # An empty key matches too, so it is refused naming the key rather than as an unknown path.
    entry_path = f"{PREFIX}/lists/{{list}}/{{key:{ANY_TEXT[:-1]}*}}"
    routes.add_put(entry_path, api.put_entry)
    routes.add_patch(entry_path, api.patch_entry)
    routes.add_delete(entry_path, api.delete_entry)
    routes.add_get(f"{PREFIX}/models", api.list_models)
    routes.add_get(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.get_model)
    routes.add_put(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.put_model)
    routes.add_patch(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.patch_model)
    routes.add_delete(f"{PREFIX}/models/{{model:{ANY_TEXT}}}", api.delete_model)
    routes.add_get(f"{PREFIX}/api-keys", api.list_keys)
    routes.add_post(f"{PREFIX}/api-keys", api.create_key)
    routes.add_delete(f"{PREFIX}/api-keys/{{id}}", api.revoke_key)
    routes.add_post(f"{PREFIX}/decide", api.decide)
    routes.add_post(f"{PREFIX}/screening/import", api.import_screening)
    routes.add_get(f"{PREFIX}/screening/search", api.search_screening)
    routes.add_get(f"{PREFIX}/screening/hits", api.screening_hits)
    routes.add_get(f"{PREFIX}/audit", api.audit)
    routes.add_get(f"{PREFIX}/changes", api.changes)
