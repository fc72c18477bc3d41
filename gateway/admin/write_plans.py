"""The admin API's writes as plans: what a write request would write, built without writing it.

A write is planned from (method, path, query, body, actor) alone, never from an aiohttp request, so
the same plan can be written now, held as a change request for a second admin's approval, or
resolved dry for an impact preview from a ``{"method", "path", "body"}`` description. The small
route table here names every write route of ``/admin/v1``; api.py mounts the same handlers.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from ..errors import GatewayError, invalid
from ..identity import hash_api_key, new_api_key
from ..policy.decide import Rules
from ..policy.model import Snapshot
from ..policy.names import COUNTRY_GROUPS, DENY_COUNTRIES, GROUP_PREFIX, LICENCES, PARTNERS, now_iso
from ..policy.validate import (
    document_references,
    document_warnings,
    drop_expired,
    entry_warnings,
    merge_patch,
    model_warnings,
    model_write,
    patch_body,
    validate_api_key_request,
    validate_entry,
    validate_list,
    validate_model_name,
    validate_policy_document,
)
from ..policy.wire import references_view
from ..screening import parse_csl
from ..storage.keys import APIKEYS_KEY, MODELS_KEY, list_key
from ..storage.ops import HashDelete, HashReplace, HashSet, HashUpdate, KeyRevoke, OpsPlan, ScreeningReplace
from .inputs import (
    entry_key_of,
    import_plan,
    import_sections,
    json_object,
    list_name_of,
    no_meta,
    parse_json,
    screening_section,
)

PREFIX = "/admin/v1"
# A change request keeps the body it was proposed with, for people to read, up to this size; a larger
# one (a whole policy, a screening list) is described by its size (its operations are kept whole).
MAX_SHOWN_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class WriteCall:
    """One write request: method, path (as sent, percent-encoded, under ``/admin/v1``), the route's
    decoded path parameters, query, raw body and who asks."""

    method: str
    path: str
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes
    actor: str
    content_type: str | None = None

    def describe(self) -> dict[str, Any]:
        """``{"method", "path", "body"}`` as proposed, for people (and for an impact preview again)."""
        body: Any = None
        if self.body.strip():
            if len(self.body) > MAX_SHOWN_BODY_BYTES:
                body = {"omitted_bytes": len(self.body)}
            else:
                try:
                    body = orjson.loads(self.body)
                except orjson.JSONDecodeError:
                    body = self.body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.path, "body": body}


@dataclass(slots=True)
class WritePlan:
    """What a write would write: its operations, change-history target, and how its answer reads."""

    ops: OpsPlan
    target: str
    # The answer's fields beside ``version`` (and ``warnings`` when any); called once the operations
    # were resolved, since a merge patch's warnings depend on the stored value it merged with.
    fields: Callable[[], dict[str, Any]] = dict
    import_whole: bool = False
    # Shown beside a change request when the write is held: a new API key's id and key.
    held_fields: Mapping[str, Any] = field(default_factory=dict)


Planner = Callable[[WriteCall], Awaitable[WritePlan]]


def _with_warnings(warnings: Collection[str], **fields: Any) -> dict[str, Any]:
    return {**fields, **({"warnings": list(warnings)} if warnings else {})}


class WritePlanner:
    """Builds the plan of each admin write; the rules and snapshot it needs are given, not fetched."""

    def __init__(
        self,
        *,
        tiers: tuple[str, ...],
        rules: Rules,
        snapshot: Callable[[], Snapshot | None] = lambda: None,
        screen_key: Callable[[dict[str, Any]], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.tiers = tiers
        self.rules = rules
        self._snapshot = snapshot  # the enforced snapshot (warnings, @GROUP and licence references)
        self._screen_key = screen_key  # screens a new API key's names: 409 screening_match or warnings
        self.routes: list[tuple[str, re.Pattern[str], Planner]] = [
            ("PUT", re.compile(r"/policy"), self.put_policy),
            ("PUT", re.compile(r"/lists/(?P<list>[^/]+)"), self.replace_list),
            ("PUT", re.compile(r"/lists/(?P<list>[^/]+)/(?P<key>[\s\S]*)"), self.put_entry),
            ("PATCH", re.compile(r"/lists/(?P<list>[^/]+)/(?P<key>[\s\S]*)"), self.patch_entry),
            ("DELETE", re.compile(r"/lists/(?P<list>[^/]+)/(?P<key>[\s\S]*)"), self.delete_entry),
            ("PUT", re.compile(r"/models/(?P<model>[\s\S]+)"), self.put_model),
            ("PATCH", re.compile(r"/models/(?P<model>[\s\S]+)"), self.patch_model),
            ("DELETE", re.compile(r"/models/(?P<model>[\s\S]+)"), self.delete_model),
            ("POST", re.compile(r"/api-keys"), self.create_key),
            ("DELETE", re.compile(r"/api-keys/(?P<id>[^/]+)"), self.revoke_key),
            ("POST", re.compile(r"/screening/import"), self.import_screening),
        ]

    # --- reaching a planner without an HTTP request -------------------------------------------

    def call_of(self, change: Any, actor: str) -> tuple[WriteCall, Planner]:
        """The write a ``{"method", "path", "body"}`` description names, and its planner; 400 naming the
        ``change`` field that is wrong."""
        description = json_object(change, ("method", "path", "body"), "change")
        method, path = description.get("method"), description.get("path")
        if method not in ("PUT", "PATCH", "POST", "DELETE"):
            raise invalid("change.method", "must be PUT, PATCH, POST or DELETE")
        if not isinstance(path, str) or not path.startswith(PREFIX + "/"):
            raise invalid("change.path", f"must be an admin write path starting with {PREFIX}/")
        raw_path, _, raw_query = path.partition("?")
        decoded = unquote(raw_path[len(PREFIX) :])
        for route_method, pattern, planner in self.routes:
            found = pattern.fullmatch(decoded)
            if found is not None and route_method == method:
                body = description.get("body")
                raw = b"" if body is None else body.encode() if isinstance(body, str) else orjson.dumps(body)
                call = WriteCall(
                    method=route_method,
                    path=path,
                    params=found.groupdict(),
                    query=dict(parse_qsl(raw_query, keep_blank_values=True)),
                    body=raw,
                    actor=actor,
                    content_type=None if isinstance(body, str) else "application/json",
                )
                return call, planner
        raise invalid("change", f"{method} {path[:120]} is not an admin write")

    # --- policy -------------------------------------------------------------------------------

    async def import_document(self, call: WriteCall) -> tuple[dict[str, Any], frozenset[str] | None, list[str]]:
        """A policy import's body, validated and normalised, its ``?sections=`` and its warnings."""
        sections = import_sections(call.query.get("sections"))
        body = parse_json(call.body)
        version = body.get("version") if isinstance(body, dict) else None
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise invalid("version", "must be a whole number (it is ignored on PUT)")
        validated = validate_policy_document(body, actor=call.actor, now_iso=now_iso(), tiers=self.tiers)
        if sections is not None:
            for name in sections:
                if name not in validated:
                    raise invalid("sections", f"names {name}, which the document does not carry")
        validated, warnings = drop_expired(validated, time.time())
        document_references(validated, references_view(self._snapshot()))
        warnings += document_warnings(validated, home_countries=self.rules.home_countries, partners=self._partners())
        if "screening" in validated:
            entries = await screening_section(validated["screening"])
            validated["screening"] = {"entries": entries}
        return validated, sections, warnings

    async def put_policy(self, call: WriteCall) -> WritePlan:
        validated, sections, warnings = await self.import_document(call)
        skipped: list[str] = []

        def fields() -> dict[str, Any]:
            notes = [
                f"{name}: not imported; the live {name} are kept (name the section with ?sections= to replace it)"
                for name in skipped
            ]
            return _with_warnings(warnings + notes)

        # Into a Redis with no policy this is the restore that starts a new generation.
        return WritePlan(import_plan(validated, sections, skipped), "policy", fields, import_whole=True)

    # --- lists --------------------------------------------------------------------------------

    def _entry_warnings(self, name: str, keys: Collection[str]) -> list[str]:
        home, partners = self.rules.home_countries, self._partners()
        return [
            warning for key in keys for warning in entry_warnings(name, key, home_countries=home, partners=partners)
        ]

    def _partners(self) -> Collection[str]:
        return partners_of(self._snapshot())

    def _check_references(
        self, *, lists: dict[str, dict[str, Any] | None] | None = None, models: dict[str, Any] | None = None
    ) -> None:
        """Refuse a write that would leave a ``@GROUP`` naming no group, or a licence naming a model the
        registry lacks, judged against this process's snapshot with the write applied. ``lists``: list ->
        {key: entry or None (deleted)}; ``models``: name -> model or None."""
        view = references_view(self._snapshot())
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
        document_references({}, view)

    def _entry(self, call: WriteCall) -> tuple[str, str]:
        name = list_name_of(call.params["list"])
        return name, entry_key_of(call.params["key"], name)

    async def put_entry(self, call: WriteCall) -> WritePlan:
        name, key = self._entry(call)
        body = parse_json(call.body)
        no_meta(body)
        entry = validate_entry(name, key, body, actor=call.actor, now_iso=now_iso(), now=time.time())
        self._check_references(lists={name: {key: entry}})
        return WritePlan(
            [HashSet(list_key(name), key, entry)],
            f"lists/{name}/{key}",
            lambda: _with_warnings(self._entry_warnings(name, [key]), list=name, key=key),
        )

    async def patch_entry(self, call: WriteCall) -> WritePlan:
        """Merge patch of one entry: fields left out keep their stored values (docs/contract.md §7)."""
        name, key = self._entry(call)
        patch = patch_body(parse_json(call.body))
        no_meta(patch)
        actor, stamp, now = call.actor, now_iso(), time.time()

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

        return WritePlan(
            [HashUpdate(list_key(name), key, update)],
            f"lists/{name}/{key}",
            lambda: _with_warnings(self._entry_warnings(name, [key]), list=name, key=key),
        )

    async def delete_entry(self, call: WriteCall) -> WritePlan:
        name, key = self._entry(call)
        self._check_references(lists={name: {key: None}})
        return WritePlan([HashDelete(list_key(name), key)], f"lists/{name}/{key}", lambda: {"list": name, "key": key})

    async def replace_list(self, call: WriteCall) -> WritePlan:
        name = list_name_of(call.params["list"])
        body = json_object(parse_json(call.body), ("entries", "allow_empty"))
        if "entries" not in body:
            raise invalid("entries", "is required: an object of key: entry")
        allow_empty = body.get("allow_empty", False)
        if not isinstance(allow_empty, bool):
            raise invalid("allow_empty", "must be true or false")
        entries = validate_list(name, body["entries"], actor=call.actor, now_iso=now_iso(), now=time.time())
        if not entries and not allow_empty:
            raise invalid("entries", 'is empty; emptying a list needs "allow_empty": true')
        if name in (COUNTRY_GROUPS, DENY_COUNTRIES, LICENCES):
            self._check_references(lists={name: _replacing(self._snapshot(), name, entries)})
        return WritePlan(
            [HashReplace(list_key(name), entries)],
            f"lists/{name}",
            lambda: _with_warnings(self._entry_warnings(name, entries), list=name, count=len(entries)),
        )

    # --- models -------------------------------------------------------------------------------

    async def put_model(self, call: WriteCall) -> WritePlan:
        """Replace a model whole: a field left out takes its default (PATCH changes only what it names).
        With ``"enforce": false`` only the model's shadow is written; the live model stays."""
        return self._model_plan(call, patch=False)

    async def patch_model(self, call: WriteCall) -> WritePlan:
        """Merge patch of a model, applied to the stored value inside the write's transaction: suspending
        a model's export leaves its ``allowed_countries`` as they are. ``"enforce": false`` patches the
        shadow; ``"enforce": true`` promotes it (model_write has the rules)."""
        return self._model_plan(call, patch=True)

    def _model_plan(self, call: WriteCall, *, patch: bool) -> WritePlan:
        name = validate_model_name(call.params["model"])
        body: Any = parse_json(call.body)
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
        return WritePlan(
            [HashUpdate(MODELS_KEY, name, update)],
            f"models/{name}",
            lambda: _with_warnings(model_warnings(name, written), name=name),
        )

    async def delete_model(self, call: WriteCall) -> WritePlan:
        name = validate_model_name(call.params["model"])
        return WritePlan([HashDelete(MODELS_KEY, name)], f"models/{name}", lambda: {"name": name})

    # --- API keys -----------------------------------------------------------------------------

    async def create_key(self, call: WriteCall) -> WritePlan:
        attributes = validate_api_key_request(parse_json(call.body), self.tiers, now=time.time())
        warnings = await self._screen_key(attributes) if self._screen_key is not None else []
        key_id = "key_" + secrets.token_hex(8)
        key = new_api_key()
        # Only the hash is stored (held in a change request too); the key exists in this one answer.
        record = {"hash": hash_api_key(key), **attributes, "created_at": now_iso(), "created_by": call.actor}
        return WritePlan(
            [HashSet(APIKEYS_KEY, key_id, record)],
            f"api-keys/{key_id}",
            lambda: _with_warnings(warnings, id=key_id, key=key),
            held_fields={"id": key_id, "key": key},
        )

    async def revoke_key(self, call: WriteCall) -> WritePlan:
        # The key goes and its revocation (hash, who, when) stays, so no import can bring it back.
        key_id = call.params["id"]
        op = KeyRevoke(key_id, revoked_by=call.actor, revoked_at=now_iso())
        return WritePlan([op], f"api-keys/{key_id}", lambda: {"id": key_id})

    # --- screening ----------------------------------------------------------------------------

    async def import_screening(self, call: WriteCall) -> WritePlan:
        if not call.body.strip():
            raise invalid("body", "a Consolidated Screening List CSV or JSON document is required")
        # Parsing a whole list takes a while: off the loop that also serves the public listener.
        entries = await asyncio.to_thread(parse_csl, call.body, content_type=call.content_type)
        return WritePlan([ScreeningReplace(entries)], "screening", lambda: {"entries": len(entries)})


def _replacing(snapshot: Any, name: str, entries: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """A whole-list replace as entry changes: the new entries, and every held one not among them gone."""
    held = (snapshot.shadow or snapshot).lists[name] if snapshot is not None else {}
    changes: dict[str, dict[str, Any] | None] = dict.fromkeys((key for key in held if key not in entries), None)
    changes.update(entries)
    return changes


def partners_of(snapshot: Any) -> Collection[str]:
    """The partners an enforced snapshot holds (none before the first load)."""
    return snapshot.lists[PARTNERS] if snapshot is not None else ()
