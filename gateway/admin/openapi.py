"""The admin API's OpenAPI 3.0 document (``GET /admin/v1/openapi.json``).

The request schemas mirror the validation in :mod:`gateway.policy.validate` and
:mod:`gateway.admin.api` (required fields, lengths, enums, ``additionalProperties:
false``), so a client generated from it sends what the gateway accepts. The
validators stay the authority: country codes, CIDRs and instants are checked
there beyond what a schema can say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..policy.names import LIST_NAMES, STAGES
from ..policy.validate import MAX_KEY_CHARS, MAX_MODEL_NAME_CHARS, MAX_REASON_CHARS

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_TEXT: dict[str, Any] = {"type": "string", "maxLength": MAX_REASON_CHARS}
_IDENT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}
_INSTANT: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "description": "ISO-8601 with a time zone, e.g. 2027-01-31T00:00:00Z",
}
_FUTURE: dict[str, Any] = {
    **_INSTANT,
    "description": "ISO-8601 with a time zone, e.g. 2027-01-31T00:00:00Z; on a "
    "write it must lie in the future (400 naming expires_at otherwise)",
}
_REGION: dict[str, Any] = {
    "type": "string",
    "minLength": 2,
    "maxLength": 6,
    "description": "ISO 3166-1 alpha-2 country or ISO 3166-2 subdivision code, e.g. US or UA-43",
}


def _stored(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["reason"],
        "description": "A list entry as the policy holds it. PUT /admin/v1/policy keeps added_by and "
        "added_at as given; a whole-list replace stamps them anew.",
        "properties": properties,
    }


_ENFORCE_ENTRY = (
    "false: a shadow entry, stored and versioned but not enforced; each request is also decided as if "
    "it were, and a different outcome is recorded (audit field shadow, gateway_shadow_decisions_total). "
    "true (the default, not stored) makes it live"
)
_ENFORCE_MODEL = (
    "false: write only the model's shadow (the model as it would be), decided alongside and not "
    "enforced; the live model stays as it is, and a model not in the registry is refused (400 naming "
    "enforce). In a PATCH, false merges into the shadow and true promotes the shadow, with the "
    "patch's other fields merged, to live and drops it. A PUT without it drops any shadow"
)


def _model_props(*, patch: bool) -> dict[str, Any]:
    if patch:
        suspended = _nullable({"type": "boolean", "description": "null: not suspended"})
    else:
        suspended = {"type": "boolean", "default": False}
    return {
        "stage": {"type": "string", "enum": list(STAGES)},
        "timeline": _nullable({"type": "array", "items": _ref("TimelineStep")}),
        "allowed_countries": _nullable({"type": "array", "items": _REGION}),
        "export_suspended": suspended,
    }


def _schemas(tiers: Sequence[str]) -> dict[str, Any]:
    entry_props = {
        "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS},
        "source": _nullable(_TEXT),
        "expires_at": _nullable(_FUTURE),
        "country": {**_REGION, "description": "ip-ranges only (required there): " + _REGION["description"]},
        "enforce": {"type": "boolean", "default": True, "description": _ENFORCE_ENTRY},
        "countries": {
            "type": "array",
            "items": {"type": "string"},
            "description": "country-groups (required there): the member codes; licences (required there): the "
            "countries it covers, codes or @GROUP names of country groups",
        },
        "org": {**_IDENT, "description": "licences only (required there): the organisation it is granted to"},
        "models": {
            "type": "array",
            "items": {"type": "string"},
            "description": "licences only (required there): the registered models it covers",
        },
    }
    # An empty added_by/added_at counts as absent: the import stamps the entry like a new one.
    stored_props = {
        **entry_props,
        "added_by": _nullable({"type": "string", "maxLength": MAX_KEY_CHARS}),
        "added_at": _nullable({"anyOf": [_INSTANT, {"type": "string", "maxLength": 0}]}),
    }
    key_props = {
        "subject": _IDENT,
        "org": _IDENT,
        "org_name": _nullable({"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS}),
        "country": _REGION,
        "tier": {"type": "string", "enum": list(tiers)},
        "expires_at": _nullable(_FUTURE),
    }
    object_of = {"type": "object", "additionalProperties": True}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "code", "request_id"],
                    "properties": {name: {"type": "string"} for name in ("message", "type", "code", "request_id")},
                }
            },
        },
        "Entry": {
            "type": "object",
            "additionalProperties": False,
            "required": ["reason"],
            "description": "A list entry as a single-entry write takes it; added_by/added_at are set by the gateway.",
            "properties": entry_props,
        },
        "EntryPatch": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "description": "JSON merge patch (RFC 7396) of an entry: only the fields named change, null "
            "removes an optional one; the merged entry is validated whole.",
            # null removes a field: an optional one (source, expires_at; country outside ip-ranges).
            "properties": {**entry_props, "country": _nullable(entry_props["country"])},
        },
        "StoredEntry": _stored(stored_props),
        "List": {
            "type": "object",
            "additionalProperties": _ref("StoredEntry"),
            "description": "key -> entry; only ip-ranges entries carry (and need) a country",
        },
        "CountryFreeList": {
            "type": "object",
            "description": "key -> entry of deny-countries, deny-entities or partners (no country)",
            "additionalProperties": {
                **_stored(stored_props),
                "properties": {k: v for k, v in stored_props.items() if k != "country"},
            },
        },
        "IpRangeList": {
            "type": "object",
            "description": "CIDR -> entry with its country",
            "additionalProperties": {**_stored(stored_props), "required": ["reason", "country"]},
        },
        "ListReplace": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entries"],
            "properties": {
                "entries": _ref("List"),
                "allow_empty": {
                    "type": "boolean",
                    "default": False,
                    "description": "required to replace a list with nothing",
                },
            },
        },
        "TimelineStep": {
            "type": "object",
            "additionalProperties": False,
            "required": ["at"],
            "minProperties": 2,
            "description": "from at on, the fields named replace the model's own (name at least one)",
            "properties": {
                "at": _INSTANT,
                "stage": {"type": "string", "enum": list(STAGES)},
                "export_suspended": {"type": "boolean"},
                "allowed_countries": _nullable({"type": "array", "items": {"type": "string"}}),
            },
        },
        "Model": {
            "type": "object",
            "additionalProperties": False,
            "required": ["stage"],
            "properties": {
                **_model_props(patch=False),
                "enforce": {"type": "boolean", "default": True, "description": _ENFORCE_MODEL},
            },
        },
        "ModelState": {
            "type": "object",
            "additionalProperties": False,
            "required": ["stage"],
            "properties": _model_props(patch=False),
        },
        "StoredModel": {
            "type": "object",
            "additionalProperties": False,
            "required": ["stage"],
            "description": "A registry entry as stored and exported; shadow: the model as its shadow write "
            "makes it (decided alongside, not enforced)",
            "properties": {**_model_props(patch=False), "shadow": _nullable(_ref("ModelState"))},
        },
        "ModelPatch": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "description": "JSON merge patch (RFC 7396) of a model: only the fields named change (so "
            "suspending export leaves allowed_countries as they are); allowed_countries "
            "null removes the country restriction; the merged model is validated whole.",
            "properties": {
                **_model_props(patch=True),
                "enforce": {"type": "boolean", "description": _ENFORCE_MODEL},
                "shadow": {"type": "null", "description": "null discards the model's shadow"},
            },
        },
        "Revocation": {
            "type": "object",
            "additionalProperties": False,
            "required": ["hash", "revoked_at", "revoked_by"],
            "properties": {
                "hash": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                "subject": _nullable(_IDENT),
                "org": _nullable(_IDENT),
                "revoked_at": _INSTANT,
                "revoked_by": _IDENT,
            },
        },
        "ApiKeyRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["subject", "org", "country", "tier"],
            "properties": key_props,
        },
        "ApiKeyRecord": {
            "type": "object",
            "additionalProperties": False,
            "required": ["hash", "subject", "org", "country", "tier"],
            "properties": {
                **key_props,
                "hash": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_KEY_CHARS,
                    "description": "sha256 hex of the key; never the key",
                },
                "created_at": _nullable(_INSTANT),
                "created_by": _nullable(_IDENT),
            },
        },
        "Screening": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"entries": {"type": "array", "items": object_of}},
        },
        "Policy": {
            "type": "object",
            "additionalProperties": False,
            "description": "Each section present is replaced whole (within lists, each list present); "
            "version is ignored on PUT. Into a Redis that holds a policy, api_keys are "
            "replaced only when ?sections= names them; into one that holds none, every "
            "section (each list, models, api_keys, screening) is required (409 "
            "policy_incomplete). revoked_api_keys are kept revocations: added to those "
            "held, never removed.",
            "properties": {
                "version": _nullable({"type": "integer", "description": "ignored on PUT"}),
                "lists": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {name: _ref("IpRangeList" if name == "ip-ranges" else "List") for name in LIST_NAMES},
                },
                "models": {"type": "object", "additionalProperties": _ref("StoredModel")},
                "api_keys": {"type": "object", "additionalProperties": _ref("ApiKeyRecord")},
                "screening": _ref("Screening"),
                "revoked_api_keys": {"type": "object", "additionalProperties": _ref("Revocation")},
            },
        },
        "DecideRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["subject", "tier", "ip"],
            "properties": {
                "subject": _IDENT,
                "org": _nullable(_IDENT),
                "org_name": _nullable({"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS}),
                "country": _nullable(_REGION),
                "tier": {"type": "string", "enum": list(tiers)},
                "ip": {"type": "string", "description": "IPv4 or IPv6 address", "maxLength": 64},
                "model": _nullable({"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}),
                "explain": {
                    "type": "string",
                    "enum": ["first", "all"],
                    "default": "first",
                    "description": "all: also list every rule that blocks, in the decision table's order",
                },
            },
        },
        "Decision": {
            "type": "object",
            "required": ["decision", "status", "code", "message", "policy_version"],
            "properties": {
                "decision": {"type": "string", "enum": ["allow", "block"]},
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "policy_version": {"type": "integer"},
                "ip_country": _nullable({"type": "string"}),
                "screening": object_of,
                "licence": {"type": "string", "description": "the licence that let the caller past row 6"},
                "blocking": {
                    "type": "array",
                    "description": 'with "explain": "all": every rule that blocks (empty when allowed)',
                    "items": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "integer"},
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
                "shadow": {
                    "type": "object",
                    "description": "present when the policy holds shadow entries or model shadows and "
                    "they would decide otherwise: that decision",
                    "required": ["decision", "status", "code", "message"],
                    "properties": {
                        "decision": {"type": "string", "enum": ["allow", "block"]},
                        "status": {"type": "integer"},
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            },
        },
        "ChangeDescription": {
            "type": "object",
            "additionalProperties": False,
            "required": ["method", "path"],
            "description": "An admin write as it would be sent: method, path under /admin/v1 (with its "
            "query), JSON body (a screening import's CSV as a string)",
            "properties": {
                "method": {"type": "string", "enum": ["PUT", "PATCH", "POST", "DELETE"]},
                "path": {"type": "string", "pattern": "^/admin/v1/", "maxLength": 2048},
                "body": _nullable({}),
            },
        },
        "ChangeRequest": {
            "type": "object",
            "required": ["id", "status", "proposed_by", "created_at", "expires_at", "effect", "change", "impact"],
            "description": "A write held for a second admin's approval (admin.approval). Once closed it "
            "also carries approved_by or rejected_by (and reason), closed_at and, when applied, version.",
            "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": ["pending", "applied", "rejected", "expired"]},
                "proposed_by": {"type": "string"},
                "created_at": _INSTANT,
                "expires_at": _INSTANT,
                "effect": {"type": "string", "enum": ["loosen", "tighten"]},
                "change": _ref("ChangeDescription"),
                "impact": _nullable({**object_of, "description": "the impact preview; null when none was made"}),
                "warnings": {"type": "array", "items": {"type": "string"}},
                "before": _nullable({}),
                "after": _nullable({}),
                "policy_version": _nullable({"type": "integer", "description": "the version it was proposed on"}),
                "generation": _nullable({"type": "string"}),
                "approved_by": {"type": "string"},
                "rejected_by": {"type": "string"},
                "reason": {"type": "string"},
                "closed_at": _INSTANT,
                "version": {"type": "integer", "description": "the policy version its approval wrote"},
                "ops": _nullable(
                    {"type": "array", "items": object_of, "description": "the operations approval applies"}
                ),
            },
            "additionalProperties": True,
        },
        "Held": {
            "type": "object",
            "required": ["change_request"],
            "description": "The write was held for approval and changed nothing. An API key issued this "
            "way carries id and key beside it (shown once; the key works once approved).",
            "properties": {
                "change_request": _ref("ChangeRequest"),
                "id": {"type": "string"},
                "key": {"type": "string", "pattern": "^gk_"},
            },
        },
        "ImpactRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["change"],
            "properties": {
                "change": _ref("ChangeDescription"),
                "hours": {
                    "type": "number",
                    "exclusiveMinimum": True,
                    "minimum": 0,
                    "maximum": 24 * 366,
                    "description": "how far back the audit trail is read (default admin.impact.hours)",
                },
            },
        },
        "Impact": {
            "type": "object",
            "description": "The recent callers decided again under the policy as the change would leave it",
            "properties": {
                "callers": {"type": "integer"},
                "would_block": {"type": "array", "items": object_of},
                "would_allow": {"type": "array", "items": object_of},
                "effect": {"type": "string", "enum": ["loosen", "tighten"]},
                "version": _nullable({"type": "integer", "description": "the policy version judged against"}),
            },
            "additionalProperties": True,
        },
        "Written": {
            "type": "object",
            "required": ["version"],
            "properties": {
                "version": {"type": "integer", "description": "the policy version now current"},
                "warnings": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "risks of a valid write (a home country denied, "
                    "an ip-ranges entry wider than /8 or /32, "
                    "allowed_countries emptied, a partner denied)",
                },
            },
            "additionalProperties": True,
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


_ERRORS = {
    "400": "bad input, named in the message; nothing changed",
    "401": "no or wrong admin token",
    "403": "the proposer approving their own change request (code approval_self)",
    "404": "no such list, entry, model or key",
    "409": "Redis holds no policy (code policy_missing); an incomplete restore (policy_incomplete); "
    "a revoked key written back (key_revoked); a change request no longer pending (change_closed, "
    "change_expired) or whose target changed since it was proposed (change_conflict)",
    "413": "body too large",
    "503": "Redis unavailable (code redis_unavailable); no impact previewer (impact_unavailable) or "
    "a preview past admin.impact.timeout_s (impact_timeout)",
}

_HELD = {
    "description": "held for a second admin's approval (admin.approval.required_for names its effect); nothing changed",
    "content": {"application/json": {"schema": _ref("Held")}},
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: Sequence[str] = ("400", "401", "503"),
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok}}
    for status in errors:
        operation["responses"][status] = {"description": _ERRORS[status], "content": _json(_ref("Error"))}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    if params:
        operation["parameters"] = params
    return operation


def _path(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


_LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}
_AUDIT_FILTERS: list[dict[str, Any]] = [
    *(
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"only records whose {name} is exactly this",
            "schema": {"type": "string", "maxLength": 256},
        }
        for name in ("subject", "org", "model", "code")
    ),
    *(
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": {"type": "string", "format": "date-time"},
        }
        for name, description in (("since", "records at or after this time"), ("until", "records before this time"))
    ),
]
_LIST = _path("list", {"type": "string", "enum": list(LIST_NAMES)}, "the list")
_KEY = _path("key", _IDENT, "the entry key, percent-encoded (a CIDR's '/' as %2F)")
_MODEL = _path(
    "model", {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME_CHARS}, "the model name, percent-encoded"
)
_SECTIONS = {
    "name": "sections",
    "in": "query",
    "required": False,
    "description": "comma-separated sections to replace, from lists, models, api_keys, screening; "
    "default: every one the document carries except api_keys",
    "schema": {"type": "string"},
}
_WRITTEN = _ok("written; the answer names the new policy version", _ref("Written"))


def _paths() -> dict[str, Any]:
    any_object = {"type": "object", "additionalProperties": True}
    entries = {"type": "object", "additionalProperties": _ref("StoredEntry")}
    return {
        "/admin/v1/openapi.json": {"get": _op("This document", _ok("OpenAPI 3.0", any_object), errors=("401",))},
        "/admin/v1/policy": {
            "get": _op("The whole policy", _ok("the policy", _ref("Policy")), errors=("401", "409", "503")),
            "put": _op(
                "Replace each section present atomically; into an empty Redis, the restore",
                _WRITTEN,
                body=_json(_ref("Policy")),
                params=[_SECTIONS],
                errors=("400", "401", "409", "413", "503"),
            ),
        },
        "/admin/v1/policy/diff": {
            "post": _op(
                "What PUT /admin/v1/policy with this body would change (added, removed, changed keys "
                "per section); changes nothing",
                _ok(
                    "the change",
                    {
                        "type": "object",
                        "required": ["sections"],
                        "properties": {
                            "version": _nullable({"type": "integer"}),
                            "restore": {"type": "boolean"},
                            "sections": any_object,
                            "warnings": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                ),
                body=_json(_ref("Policy")),
                params=[_SECTIONS],
                errors=("400", "401", "409", "413", "503"),
            ),
        },
        "/admin/v1/lists/{list}": {
            "get": _op(
                "One list",
                _ok(
                    "the list",
                    {
                        "type": "object",
                        "properties": {"version": {"type": "integer"}, "list": {"type": "string"}, "entries": entries},
                    },
                ),
                params=[_LIST],
                errors=("401", "404", "409", "503"),
            ),
            "put": _op(
                "Replace a list atomically",
                _WRITTEN,
                body=_json(_ref("ListReplace")),
                params=[_LIST],
                errors=("400", "401", "404", "409", "413", "503"),
            ),
        },
        "/admin/v1/lists/{list}/{key}": {
            "put": _op(
                "Add or change one entry",
                _WRITTEN,
                body=_json(_ref("Entry")),
                params=[_LIST, _KEY],
                errors=("400", "401", "404", "409", "413", "503"),
            ),
            "patch": _op(
                "Change only the fields named (JSON merge patch); 404 if the entry is absent",
                _WRITTEN,
                body={"application/merge-patch+json": {"schema": _ref("EntryPatch")}, **_json(_ref("EntryPatch"))},
                params=[_LIST, _KEY],
                errors=("400", "401", "404", "409", "413", "503"),
            ),
            "delete": _op(
                "Remove one entry", _WRITTEN, params=[_LIST, _KEY], errors=("400", "401", "404", "409", "503")
            ),
        },
        "/admin/v1/models": {
            "get": _op("The model registry", _ok("the models", any_object), errors=("401", "409", "503")),
        },
        "/admin/v1/models/{model}": {
            "get": _op(
                "One model", _ok("the model", any_object), params=[_MODEL], errors=("400", "401", "404", "409", "503")
            ),
            "put": _op(
                "Add a model or replace it whole (fields left out take their defaults)",
                _WRITTEN,
                body=_json(_ref("Model")),
                params=[_MODEL],
                errors=("400", "401", "404", "409", "413", "503"),
            ),
            "patch": _op(
                "Change only the fields named (JSON merge patch); 404 if the model is absent",
                _WRITTEN,
                body={"application/merge-patch+json": {"schema": _ref("ModelPatch")}, **_json(_ref("ModelPatch"))},
                params=[_MODEL],
                errors=("400", "401", "404", "409", "413", "503"),
            ),
            "delete": _op("Remove a model", _WRITTEN, params=[_MODEL], errors=("400", "401", "404", "409", "503")),
        },
        "/admin/v1/api-keys": {
            "get": _op("Issued keys (hashes, never keys)", _ok("the keys", any_object), errors=("401", "409", "503")),
            "post": _op(
                "Issue a key; the key is in this answer only. Its org and org_name are screened first: a match is "
                "409 screening_match and no key is issued",
                _ok(
                    "issued",
                    {
                        "type": "object",
                        "required": ["version", "id", "key"],
                        "properties": {
                            "version": {"type": "integer"},
                            "id": {"type": "string"},
                            "key": {"type": "string", "pattern": "^gk_"},
                            "warnings": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "the org or org name screens in the review band",
                            },
                        },
                    },
                ),
                body=_json(_ref("ApiKeyRequest")),
                errors=("400", "401", "409", "413", "503"),
            ),
        },
        "/admin/v1/api-keys/{id}": {
            "delete": _op(
                "Revoke a key; the revocation is kept, so no write can make it active again",
                _WRITTEN,
                params=[_path("id", _IDENT, "the key id")],
                errors=("401", "404", "409", "503"),
            ),
        },
        "/admin/v1/decide": {
            "post": _op(
                "The decision the gateway would make now (consumes no rate limit)",
                _ok("the decision", _ref("Decision")),
                body=_json(_ref("DecideRequest")),
                errors=("400", "401", "413"),
            ),
        },
        "/admin/v1/screening/import": {
            "post": _op(
                "Replace the screening list with a Consolidated Screening List export",
                _WRITTEN,
                body={
                    "text/csv": {"schema": {"type": "string"}},
                    "application/json": {
                        "schema": {"type": "object", "properties": {"results": {"type": "array", "items": any_object}}}
                    },
                },
                errors=("400", "401", "409", "413", "503"),
            ),
        },
        "/admin/v1/screening/hits": {
            "get": _op(
                "API keys and partners whose names the last screening import found to match (rule 2 blocks them)",
                _ok(
                    "the hits",
                    {
                        "type": "object",
                        "properties": {
                            "version": _nullable({"type": "integer"}),
                            "screened_at": _nullable({"type": "string"}),
                            "hits": {"type": "array", "items": any_object},
                        },
                    },
                ),
                params=[
                    {
                        "name": "new",
                        "in": "query",
                        "required": False,
                        "description": "true: only the hits the last import found first",
                        "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                    }
                ],
                errors=("400", "401", "503"),
            ),
        },
        "/admin/v1/screening/search": {
            "get": _op(
                "Scored matches of a name against the screening list",
                _ok(
                    "matches",
                    {
                        "type": "object",
                        "properties": {
                            "version": {"type": "integer"},
                            "matches": {"type": "array", "items": any_object},
                        },
                    },
                ),
                params=[
                    {
                        "name": "name",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 500},
                    },
                    {**_LIMIT, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}},
                    {
                        "name": "min_score",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
                    },
                ],
                errors=("400", "401", "409", "503"),
            ),
        },
        "/admin/v1/audit": {
            "get": _op(
                "Audit records, newest first; with filters, the newest that match (``scanned``: entries read, "
                "``complete``: false when the read stopped at its cap and older matches may exist)",
                _ok(
                    "records",
                    {
                        "type": "object",
                        "properties": {
                            "records": {"type": "array", "items": any_object},
                            "scanned": {"type": "integer"},
                            "complete": {"type": "boolean"},
                        },
                    },
                ),
                params=[_LIMIT, *_AUDIT_FILTERS],
                errors=("400", "401", "503"),
            ),
        },
        "/admin/v1/changes": {
            "get": _op(
                "Change history (actor, time, target, before, after, version, effect), newest first",
                _ok("changes", {"type": "object", "properties": {"changes": {"type": "array", "items": any_object}}}),
                params=[_LIMIT],
                errors=("400", "401", "503"),
            ),
        },
    }


def _with_held(paths: dict[str, Any]) -> dict[str, Any]:
    """Every write may be held for approval: a 202 beside its 200."""
    for path, operations in paths.items():
        if path in ("/admin/v1/policy/diff", "/admin/v1/decide", "/admin/v1/impact") or "change-requests" in path:
            continue
        for method, operation in operations.items():
            if method in ("put", "patch", "post", "delete"):
                operation["responses"]["202"] = _HELD
    return paths


def _change_request_paths() -> dict[str, Any]:
    request_id = _path("id", {"type": "string", "minLength": 1, "maxLength": 64}, "the change request id")
    one = _ok("the change request", {"type": "object", "properties": {"change_request": _ref("ChangeRequest")}})
    optional = {"required": False, "content": _json({"type": "object", "additionalProperties": False})}
    reject_body = {
        "required": False,
        "content": _json(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 1000}},
            }
        ),
    }
    approve = _op(
        "Approve another admin's change request: apply its stored operations atomically",
        _ok(
            "applied",
            {
                "type": "object",
                "required": ["version", "change_request"],
                "properties": {"version": {"type": "integer"}, "change_request": _ref("ChangeRequest")},
            },
        ),
        params=[request_id],
        errors=("400", "401", "403", "404", "409", "503"),
    )
    approve["requestBody"] = optional
    reject = _op(
        "Reject a pending change request (its proposer may withdraw it); nothing is applied",
        one,
        params=[request_id],
        errors=("400", "401", "404", "409", "503"),
    )
    reject["requestBody"] = reject_body
    status = {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["pending", "applied", "rejected", "expired"]},
    }
    return {
        "/admin/v1/change-requests": {
            "get": _op(
                "Change requests, newest first (a pending one past expires_at shows as expired)",
                _ok(
                    "change requests",
                    {
                        "type": "object",
                        "properties": {"change_requests": {"type": "array", "items": _ref("ChangeRequest")}},
                    },
                ),
                params=[status, _LIMIT],
                errors=("400", "401", "503"),
            ),
        },
        "/admin/v1/change-requests/{id}": {
            "get": _op(
                "One change request, with the operations its approval applies",
                one,
                params=[request_id],
                errors=("401", "404", "503"),
            ),
        },
        "/admin/v1/change-requests/{id}/approve": {"post": approve},
        "/admin/v1/change-requests/{id}/reject": {"post": reject},
        "/admin/v1/impact": {
            "post": _op(
                "Preview a change's impact on recent callers; the change is resolved as its write "
                "would be and nothing is written",
                _ok("the impact", _ref("Impact")),
                body=_json(_ref("ImpactRequest")),
                errors=("400", "401", "404", "409", "413", "503"),
            ),
        },
    }


def openapi_document(*, tiers: Sequence[str]) -> dict[str, Any]:
    """The document for this gateway; ``tiers`` (from the config) are the valid ``tier`` values."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Export-control gateway admin API",
            "version": "1",
            "description": "Operator API on the admin listener. Every path needs "
            "'Authorization: Bearer <admin token>'. Errors have the body "
            '{"error": {"message", "type", "code", "request_id"}}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"adminToken": []}],
        "paths": {**_with_held(_paths()), **_change_request_paths()},
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(tiers),
        },
    }
