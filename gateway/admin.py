"""The operator API on the admin listener (docs/contract.md §7): one write path, token auth, JSON errors.

Every write runs validate -> one :meth:`Store.write` (data, version bump and
change record in one transaction) -> publish, then refreshes this process's
snapshot so the operator's next call already sees the change. Reads of the
policy go to Redis, the authority; ``decide`` and screening searches use the
snapshot the public listener enforces.

Operators' everyday commands must not reopen access by accident, so: PATCH
(RFC 7396 merge patch) changes only the fields it names, merged and validated
against the stored value inside the write's transaction; an ``expires_at`` in
the past is refused; a restore into an empty Redis must carry every part; a
revoked API key is never written back; risky but valid writes answer with
``warnings``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .caller import Caller
from .countries import validate_region
from .errors import GatewayError, bad_request, error_response, json_response
from .identity import hash_api_key, new_api_key
from .logs import request_id_for
from .openapi import openapi_document
from .policy import (
    LIST_NAMES,
    PARTNERS,
    PolicyValidationError,
    decide,
    document_warnings,
    drop_expired,
    entry_warnings,
    merge_patch,
    missing_parts,
    model_warnings,
    normalize_key,
    patch_body,
    policy_diff,
    validate_api_key_request,
    validate_entry,
    validate_list,
    validate_model,
    validate_model_name,
    validate_policy_document,
)
from .screening import ScreeningFormatError, ScreeningIndex, parse_csl
from .settings import Admin, ConfigError, read_secret
from .storage.clients import StoreUnavailable
from .storage.keys import APIKEYS_KEY, MODELS_KEY, list_key
from .storage.ops import (
    HashDelete,
    HashReplace,
    HashSet,
    HashUpdate,
    KeyRevoke,
    KeyRevoked,
    NotFound,
    OpsPlan,
    PolicyIncomplete,
    PolicyMissing,
    ScreeningReplace,
    policy_ops,
)
from .storage.store import Store

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway.admin")

PREFIX = "/admin/v1"
# Monitoring must work without the admin token (docs/contract.md §1).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_TOKEN_CHARS = 4096
# The search name travels in the query string; 500 characters, percent-encoded, stay inside
# the request-line limit of the HTTP parser.
MAX_SEARCH_CHARS = 500
ANY_TEXT = r"[\s\S]+"
_TOKEN_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")

ACTOR_KEY: web.RequestKey[str] = web.RequestKey("admin_actor", str)
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("admin_request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# --- who may call ---------------------------------------------------------------------------


def parse_tokens_file(path: Path) -> list[tuple[str, bytes]]:
    """Lines ``name: sha256-hex`` (blank lines and ``#`` comments ignored) -> (actor, digest)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"admin.tokens_file: cannot read {path}: {exc.strerror}") from None
    tokens: list[tuple[str, bytes]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = (part.strip() for part in line.partition(":"))
        if not sep or not _TOKEN_NAME.fullmatch(name) or not _HEX_DIGEST.fullmatch(digest):
            raise ConfigError(f"admin.tokens_file: {path} line {number}: expected 'name: <sha256 hex "
                              "of the token>' with a name of letters, digits, '.', '_', '@' or '-'")
        tokens.append((name, bytes.fromhex(digest)))
    return tokens


class AdminTokens:
    """The admin token (``admin.token_env``, actor "admin") and the named ones in ``admin.tokens_file``.

    The file is re-read when it changes, so a token is added or withdrawn without a restart.
    """

    def __init__(self, settings: Admin, environ: Mapping[str, str]) -> None:
        token = read_secret(settings.token_env, environ)
        self._env: list[tuple[str, bytes]] = [("admin", _digest(token))] if token else []
        self._path = settings.tokens_file
        self._file: list[tuple[str, bytes]] = []
        self._stamp: tuple[float, int] | None = None
        if self._path is not None:
            self._stamp = self._file_stamp()
            self._file = parse_tokens_file(self._path)
        if not self._env and not self._file:
            log.warning("no admin token configured: every /admin/v1 request will be refused")

    def _file_stamp(self) -> tuple[float, int] | None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def _file_tokens(self) -> list[tuple[str, bytes]]:
        if self._path is None:
            return []
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._file = parse_tokens_file(self._path)
            except ConfigError as exc:
                # A half-edited file must not lock every operator out: keep the last good tokens.
                log.error("admin tokens file not reloaded: %s", exc)
        return self._file

    def actor(self, authorization: str | None) -> str | None:
        """The actor a Bearer header names, or None. Every known digest is compared, in constant time."""
        token = _bearer(authorization)
        if token is None:
            return None
        digest = _digest(token)
        actor: str | None = None
        for name, expected in (*self._env, *self._file_tokens()):
            if hmac.compare_digest(digest, expected) and actor is None:
                actor = name
        return actor


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


# --- input helpers --------------------------------------------------------------------------


def invalid(field: str, message: str) -> GatewayError:
    return bad_request(f"{field}: {message}")


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found", message)


def policy_missing(*, read: bool = False) -> GatewayError:
    if read:
        return GatewayError(409, "policy_missing",
                            "No policy is loaded: Redis holds none (emptied, or restarted without its "
                            "data), so there is nothing to show and every caller is answered 503 "
                            "policy_stale. Restore a whole policy from a backup: gateway policy import "
                            "BACKUP.yaml (PUT /admin/v1/policy with every section).")
    return GatewayError(409, "policy_missing",
                        "Redis holds no policy: restore one with PUT /admin/v1/policy (gateway policy "
                        "import FILE) before changing single entries.")


def policy_incomplete(missing: Sequence[str]) -> GatewayError:
    return GatewayError(409, "policy_incomplete",
                        f"Redis holds no policy, so this import is a restore and must carry every "
                        f"section; missing: {', '.join(missing)} (write an empty one as empty, e.g. "
                        f"partners: {{}}, screening: {{entries: []}}). Nothing was written; `gateway "
                        f"policy export` writes a complete file.")


def key_revoked(exc: KeyRevoked) -> GatewayError:
    record = exc.revoked
    return GatewayError(409, "key_revoked",
                        f"API key {exc.key_id!r} was revoked at {record.get('revoked_at')} by "
                        f"{record.get('revoked_by')}; a revoked key (its id or its hash) is never made "
                        "active again. Nothing was changed; issue a new key with POST /admin/v1/api-keys.",
                        error_type="invalid_request_error")


# Sections a whole-policy import may name in ``?sections=``; without it, an import into a Redis that
# holds a policy writes every section the document carries except ``api_keys`` (revocations stick).
IMPORT_SECTIONS = ("lists", "models", "api_keys", "screening")


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise invalid("body", "a JSON object is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid("body", f"is not valid JSON ({exc})") from None


def _object(body: Any, allowed: Sequence[str], where: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise invalid(where, "must be a JSON object")
    for name in body:
        if name not in allowed:
            shown = name if len(name) <= 60 else name[:60] + "..."  # the message echoes it back
            raise invalid(shown if where == "body" else f"{where}.{shown}",
                          f"unknown field; expected one of {', '.join(sorted(allowed))}")
    return body


def query_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _list_name(request: web.Request) -> str:
    name = request.match_info["list"]
    if name not in LIST_NAMES:
        raise not_found(f"No list named {name[:60]!r}; the lists are {', '.join(LIST_NAMES)}.")
    return name


def _optional_text(value: Any, field: str, limit: int = 256) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a non-empty string or null")
    if len(value) > limit:
        raise invalid(field, f"must be at most {limit} characters")
    return value


def _sorted(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: mapping[key] for key in sorted(mapping)}


# --- the API --------------------------------------------------------------------------------


class AdminApi:
    """Handlers for ``/admin/v1``; ``gateway`` supplies the store, the watcher and the static rules."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.tokens = AdminTokens(gateway.settings.admin, gateway.environ)
        self.tiers = tuple(gateway.settings.tiers)
        self._refresh_lock = asyncio.Lock()
        self._openapi = orjson.dumps(openapi_document(tiers=self.tiers))

    @property
    def store(self) -> Store:
        if self.gateway.store is None:
            raise GatewayError(503, "redis_unavailable", "The gateway has no Redis connection yet.")
        return self.gateway.store

    # middleware

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure ends as a contract error body; nothing escapes as aiohttp's HTML page."""
        request_id = request_id_for(request.headers.get("X-Request-Id"))
        request[REQUEST_ID_KEY] = request_id
        try:
            response = await handler(request)
        except GatewayError as err:
            response = self._error(err, request_id)
        except PolicyValidationError as exc:
            response = self._error(invalid(exc.field or "body", exc.message), request_id)
        except ScreeningFormatError as exc:
            response = self._error(bad_request(str(exc)), request_id)
        except PolicyMissing:
            response = self._error(policy_missing(), request_id)
        except PolicyIncomplete as exc:
            response = self._error(policy_incomplete(exc.missing), request_id)
        except KeyRevoked as exc:
            response = self._error(key_revoked(exc), request_id)
        except NotFound as exc:
            response = self._error(not_found(f"No entry {str(exc)[:80]!r} to change or delete."), request_id)
        except StoreUnavailable as exc:
            log.warning("admin request failed: %s", exc)
            response = self._error(GatewayError(503, "redis_unavailable",
                                                "Redis is unavailable; nothing was changed. Retry "
                                                "when it is back."), request_id)
        except web.HTTPException as exc:
            response = self._error(_http_error(exc), request_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin request failed", extra={"request_id": request_id, "path": request.path})
            response = self._error(GatewayError(500, "internal_error",
                                                "The gateway failed to handle this request; see its log "
                                                f"for request id {request_id}."), request_id)
        response.headers["X-Request-Id"] = request_id
        return response

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        actor = self.tokens.actor(header)
        if actor is None:
            # Unknown paths too: without the token nothing here is revealed, not even what exists.
            settings = self.gateway.settings.admin
            where = f"the variable {settings.token_env}"
            if settings.tokens_file is not None:
                where += " or a token listed in admin.tokens_file"
            told = ("The admin token is not accepted" if _bearer(header) is not None
                    else "No admin token was sent")
            raise GatewayError(401, "unauthenticated",
                               f"{told}: send 'Authorization: Bearer <admin token>' with the token the "
                               f"gateway was started with ({where}; the CLI reads GATEWAY_ADMIN_TOKEN). "
                               "User tokens and API keys are not accepted here.")
        request[ACTOR_KEY] = actor
        return await handler(request)

    def _error(self, err: GatewayError, request_id: str) -> web.Response:
        return error_response(err, request_id=request_id, policy_version=self.gateway.policy_version())

    # the write path

    async def _write(self, request: web.Request, ops: OpsPlan, target: str, *,
                     import_whole: bool = False) -> int:
        version, _change = await self.store.write(ops, actor=request[ACTOR_KEY], now_iso=now_iso(),
                                                  target=target, import_whole=import_whole)
        await self._catch_up(version)
        return version

    async def _catch_up(self, version: int) -> None:
        """Load the version just written into this process's snapshot before answering."""
        watcher = self.gateway.watcher
        if watcher is None:
            return
        try:
            async with self._refresh_lock:
                for _attempt in range(3):
                    await watcher.refresh()
                    if watcher.version >= version:
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
        return self.gateway.rules.home_countries

    def _partners(self) -> Collection[str]:
        """The partners the enforced snapshot holds (for the deny-entities warning)."""
        watcher = self.gateway.watcher
        snapshot = watcher.snapshot if watcher else None
        return snapshot.lists[PARTNERS] if snapshot is not None else ()

    def _entry_warnings(self, name: str, keys: Collection[str]) -> list[str]:
        home, partners = self._home_countries(), self._partners()
        return [warning for key in keys
                for warning in entry_warnings(name, key, home_countries=home, partners=partners)]

    # policy

    async def get_policy(self, _request: web.Request) -> web.Response:
        found = await self.store.load_document()
        if found is None:
            raise policy_missing(read=True)
        data, screening = found
        # Every section, an empty one as empty, so an export restores a Redis that holds nothing.
        return json_response({
            "version": data.version,
            "lists": {name: _sorted(data.lists[name]) for name in LIST_NAMES},
            "models": _sorted(data.models),
            "api_keys": _sorted(data.api_keys),
            "screening": {"entries": screening},
            "revoked_api_keys": _sorted(data.revoked),
        })

    async def _import_document(self, request: web.Request
                               ) -> tuple[dict[str, Any], frozenset[str] | None, list[str]]:
        """A policy import's body, validated and normalised, its ``?sections=`` and its warnings."""
        sections = _import_sections(request.query.get("sections"))
        body = await read_json(request)
        version = body.get("version") if isinstance(body, dict) else None
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise invalid("version", "must be a whole number (it is ignored on PUT)")
        validated = validate_policy_document(body, actor=request[ACTOR_KEY], now_iso=now_iso(),
                                             tiers=self.tiers)
        if sections is not None:
            for name in sections:
                if name not in validated:
                    raise invalid("sections", f"names {name}, which the document does not carry")
        validated, warnings = drop_expired(validated, time.time())
        warnings += document_warnings(validated, home_countries=self._home_countries(),
                                      partners=self._partners())
        if "screening" in validated:
            entries = await _screening_section(validated["screening"])
            validated["screening"] = {"entries": entries}
        return validated, sections, warnings

    async def put_policy(self, request: web.Request) -> web.Response:
        validated, sections, warnings = await self._import_document(request)
        skipped: list[str] = []
        plan = _import_plan(validated, sections, skipped)
        # Into a Redis with no policy this is the restore that starts a new generation.
        version = await self._write(request, plan, "policy", import_whole=True)
        warnings += [f"{name}: not imported; the live {name} are kept (name the section with "
                     f"?sections= to replace it)" for name in skipped]
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
            current = {"lists": data.lists, "models": data.models, "api_keys": data.api_keys,
                       "screening": {"entries": screening}, "revoked_api_keys": data.revoked}
            named = sections if sections is not None else frozenset(IMPORT_SECTIONS) - {"api_keys"}
            chosen = {k: v for k, v in validated.items() if k in named or k == "revoked_api_keys"}
            version = data.version
        revoked = {**current.get("revoked_api_keys", {}), **validated.get("revoked_api_keys", {})}
        by_hash = {record.get("hash"): key_id for key_id, record in revoked.items()}
        for key_id, record in (chosen.get("api_keys") or {}).items():
            hit = key_id if key_id in revoked else by_hash.get(record.get("hash"))
            if hit is not None:
                raise key_revoked(KeyRevoked(hit, revoked[hit]))
        answer: dict[str, Any] = {"version": version, "restore": found is None,
                                  "sections": policy_diff(current, chosen)}
        if warnings:
            answer["warnings"] = warnings
        return json_response(answer)

    # lists

    async def get_list(self, request: web.Request) -> web.Response:
        name = _list_name(request)
        version, entries = await self._read_hash(list_key(name))
        return json_response({"version": version, "list": name, "entries": _sorted(entries)})

    async def put_entry(self, request: web.Request) -> web.Response:
        name = _list_name(request)
        key = _entry_key(request, name)
        body = await read_json(request)
        _no_meta(body)
        entry = validate_entry(name, key, body, actor=request[ACTOR_KEY], now_iso=now_iso(), now=time.time())
        version = await self._write(request, [HashSet(list_key(name), key, entry)], f"lists/{name}/{key}")
        return _written(version, self._entry_warnings(name, [key]), list=name, key=key)

    async def patch_entry(self, request: web.Request) -> web.Response:
        """Merge patch of one entry: fields left out keep their stored values (docs/contract.md §7)."""
        name = _list_name(request)
        key = _entry_key(request, name)
        patch = patch_body(await read_json(request))
        _no_meta(patch)
        actor, stamp, now = request[ACTOR_KEY], now_iso(), time.time()

        def update(stored: dict[str, Any] | None) -> dict[str, Any]:
            if stored is None:
                raise GatewayError(404, "not_found", f"No entry {key!r} in {name} to patch; create it "
                                   f"with PUT /admin/v1/lists/{name}/{{key}}.")
            merged = merge_patch({k: v for k, v in stored.items() if k not in ("added_by", "added_at")}, patch)
            # Validated whole, as PUT would be; added_by/added_at record this change.
            return validate_entry(name, key, merged, actor=actor, now_iso=stamp, now=now)

        version = await self._write(request, [HashUpdate(list_key(name), key, update)], f"lists/{name}/{key}")
        return _written(version, self._entry_warnings(name, [key]), list=name, key=key)

    async def delete_entry(self, request: web.Request) -> web.Response:
        name = _list_name(request)
        key = _entry_key(request, name)
        version = await self._write(request, [HashDelete(list_key(name), key)], f"lists/{name}/{key}")
        return json_response({"version": version, "list": name, "key": key})

    async def replace_list(self, request: web.Request) -> web.Response:
        name = _list_name(request)
        body = _object(await read_json(request), ("entries", "allow_empty"))
        if "entries" not in body:
            raise invalid("entries", "is required: an object of key: entry")
        allow_empty = body.get("allow_empty", False)
        if not isinstance(allow_empty, bool):
            raise invalid("allow_empty", "must be true or false")
        entries = validate_list(name, body["entries"], actor=request[ACTOR_KEY], now_iso=now_iso(),
                                now=time.time())
        if not entries and not allow_empty:
            raise invalid("entries", 'is empty; emptying a list needs "allow_empty": true')
        version = await self._write(request, [HashReplace(list_key(name), entries)], f"lists/{name}")
        return _written(version, self._entry_warnings(name, entries), list=name, count=len(entries))

    # models

    async def list_models(self, _request: web.Request) -> web.Response:
        version, models = await self._read_hash(MODELS_KEY)
        return json_response({"version": version, "models": _sorted(models)})

    async def get_model(self, request: web.Request) -> web.Response:
        name = validate_model_name(request.match_info["model"])
        version, models = await self._read_hash(MODELS_KEY)
        if name not in models:
            raise not_found(f"No model {name[:80]!r} in the registry.")
        return json_response({"version": version, "name": name, "model": models[name]})

    async def put_model(self, request: web.Request) -> web.Response:
        """Replace a model whole: a field left out takes its default (PATCH changes only what it names)."""
        name = validate_model_name(request.match_info["model"])
        model = validate_model(name, await read_json(request))
        version = await self._write(request, [HashSet(MODELS_KEY, name, model)], f"models/{name}")
        return _written(version, model_warnings(name, model), name=name)

    async def patch_model(self, request: web.Request) -> web.Response:
        """Merge patch of a model, applied to the stored value inside the write's transaction: suspending
        a model's export leaves its ``allowed_countries`` as they are."""
        name = validate_model_name(request.match_info["model"])
        patch = patch_body(await read_json(request))
        merged_model: dict[str, Any] = {}

        def update(stored: dict[str, Any] | None) -> dict[str, Any]:
            if stored is None:
                raise GatewayError(404, "not_found", f"No model {name[:80]!r} in the registry to patch; "
                                   "add it with PUT /admin/v1/models/{model}.")
            merged_model.clear()
            merged_model.update(validate_model(name, merge_patch(stored, patch)))
            return merged_model

        version = await self._write(request, [HashUpdate(MODELS_KEY, name, update)], f"models/{name}")
        return _written(version, model_warnings(name, merged_model), name=name)

    async def delete_model(self, request: web.Request) -> web.Response:
        name = validate_model_name(request.match_info["model"])
        version = await self._write(request, [HashDelete(MODELS_KEY, name)], f"models/{name}")
        return json_response({"version": version, "name": name})

    # API keys

    async def list_keys(self, _request: web.Request) -> web.Response:
        version, keys = await self._read_hash(APIKEYS_KEY)
        return json_response({"version": version, "api_keys": _sorted(keys)})

    async def create_key(self, request: web.Request) -> web.Response:
        attributes = validate_api_key_request(await read_json(request), self.tiers, now=time.time())
        key_id = "key_" + secrets.token_hex(8)
        key = new_api_key()
        # Only the hash is stored; the key itself exists in this one response.
        record = {"hash": hash_api_key(key), **attributes, "created_at": now_iso(),
                  "created_by": request[ACTOR_KEY]}
        version = await self._write(request, [HashSet(APIKEYS_KEY, key_id, record)], f"api-keys/{key_id}")
        return json_response({"version": version, "id": key_id, "key": key})

    async def revoke_key(self, request: web.Request) -> web.Response:
        # The key goes and its revocation (hash, who, when) stays, so no import can bring it back.
        key_id = request.match_info["id"]
        op = KeyRevoke(key_id, revoked_by=request[ACTOR_KEY], revoked_at=now_iso())
        version = await self._write(request, [op], f"api-keys/{key_id}")
        return json_response({"version": version, "id": key_id})

    # decisions

    async def decide(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request),
                       ("subject", "org", "org_name", "country", "tier", "ip", "model"))
        caller_fields = self._decide_fields(body)
        gateway = self.gateway
        watcher = gateway.watcher
        snapshot = watcher.snapshot if watcher else None
        ip = caller_fields.pop("ip")
        ip_country, ip_subdivision = gateway.geo.resolve(ip, snapshot.ip_ranges if snapshot else {})
        model = caller_fields.pop("model")
        caller = Caller(**caller_fields, ip=ip, ip_country=ip_country, ip_subdivision=ip_subdivision)
        decision = decide(snapshot, caller, model, gateway.clock(), gateway.rules,
                          stale=watcher is None or watcher.stale())
        answer = decision.to_dict()
        if answer.get("screening") is None:
            answer.pop("screening", None)
        answer["ip_country"] = ip_subdivision or ip_country
        return json_response(answer)

    def _decide_fields(self, body: Mapping[str, Any]) -> dict[str, Any]:
        subject = _optional_text(body.get("subject"), "subject")
        if subject is None:
            raise invalid("subject", "is required")
        tier = body.get("tier")
        if not isinstance(tier, str) or tier not in self.tiers:
            raise invalid("tier", f"must be one of {', '.join(self.tiers)}")
        ip = body.get("ip")
        try:
            if not isinstance(ip, str) or len(ip) > 64:
                raise ValueError
            address = str(ipaddress.ip_address(ip))
        except ValueError:
            raise invalid("ip", "must be an IPv4 or IPv6 address such as 203.0.113.7") from None
        country = body.get("country")
        if country is not None:
            try:
                country = validate_region(country)
            except ValueError as exc:
                raise invalid("country", str(exc)) from None
        return {"subject": subject, "org": _optional_text(body.get("org"), "org"),
                "org_name": _optional_text(body.get("org_name"), "org_name", 1000),
                "claimed_country": country, "tier": tier, "ip": address,
                "model": _optional_text(body.get("model"), "model")}

    # screening

    async def import_screening(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip():
            raise invalid("body", "a Consolidated Screening List CSV or JSON document is required")
        # Parsing a whole list takes a while: off the loop that also serves the public listener.
        entries = await asyncio.to_thread(parse_csl, raw, content_type=request.headers.get("Content-Type"))
        version = await self._write(request, [ScreeningReplace(entries)], "screening")
        return json_response({"version": version, "entries": len(entries)})

    async def search_screening(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        if not name.strip():
            raise invalid("name", "is required: the name to screen")
        if len(name) > MAX_SEARCH_CHARS:
            raise invalid("name", f"must be at most {MAX_SEARCH_CHARS} characters")
        limit = query_limit(request) if "limit" in request.query else 10
        min_score = _min_score(request.query.get("min_score"))
        index, version = await self._screening_index()
        hits = index.search(name, limit=limit, min_score=min_score) if index is not None else []
        cfg = self.gateway.settings.screening
        return json_response({"version": version, "name": name, "block_threshold": cfg.block_threshold,
                              "review_threshold": cfg.review_threshold,
                              "matches": [hit.to_dict() for hit in hits]})

    async def _screening_index(self) -> tuple[ScreeningIndex | None, int]:
        watcher = self.gateway.watcher
        snapshot = watcher.snapshot if watcher else None
        if snapshot is not None and (snapshot.screening is None or isinstance(snapshot.screening,
                                                                              ScreeningIndex)):
            # The index the public listener screens with, so a search shows what a request would meet.
            return snapshot.screening, snapshot.version
        found = await self.store.load_document()
        if found is None:
            raise policy_missing(read=True)
        data, entries = found
        cfg = self.gateway.settings.screening
        if not entries:
            return None, data.version
        index = await asyncio.to_thread(ScreeningIndex, entries, block_threshold=cfg.block_threshold,
                                        review_threshold=cfg.review_threshold, cache_size=0)
        return index, data.version

    # history

    async def audit(self, request: web.Request) -> web.Response:
        return json_response({"records": await self.store.read_audit(query_limit(request))})

    async def changes(self, request: web.Request) -> web.Response:
        return json_response({"changes": await self.store.read_changes(query_limit(request))})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def _written(version: int, warnings: Sequence[str], **fields: Any) -> web.Response:
    """A write's answer: the new version, what was written and, when any, the risks it carries."""
    answer: dict[str, Any] = {"version": version, **fields}
    if warnings:
        answer["warnings"] = list(warnings)
    return json_response(answer)


def _entry_key(request: web.Request, name: str) -> str:
    raw = request.match_info["key"]
    if not raw:
        raise invalid("key", f"is empty: name the entry in the path, e.g. /admin/v1/lists/{name}/"
                      f"{_EXAMPLE_KEYS[name]} (percent-encode a CIDR's / as %2F)")
    return normalize_key(name, raw)


_EXAMPLE_KEYS = {"deny-countries": "CU", "deny-entities": "example-org", "partners": "example-org",
                 "ip-ranges": "203.0.113.0%2F24"}


def _no_meta(body: Any) -> None:
    if isinstance(body, dict):
        for field in ("added_by", "added_at"):
            if field in body:
                raise invalid(field, "is set by the gateway; it is accepted only by PUT /admin/v1/policy")


def _import_sections(raw: str | None) -> frozenset[str] | None:
    """``?sections=lists,models,...``: the sections an import writes; None when not given."""
    if raw is None:
        return None
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise invalid("sections", f"names no section; expected some of {', '.join(IMPORT_SECTIONS)}")
    for name in names:
        if name not in IMPORT_SECTIONS:
            raise invalid("sections", f"{name[:40]!r} is not a section; expected some of "
                          f"{', '.join(IMPORT_SECTIONS)}")
    return frozenset(names)


def _import_plan(document: Mapping[str, Any], sections: frozenset[str] | None,
                 skipped: list[str] | None = None) -> OpsPlan:
    """The operations of an import, chosen in the write's transaction: into a Redis that holds a policy,
    the sections named (by default every one the document carries but ``api_keys``); into one that
    holds none, the whole document (a restore, which the store checks is complete). Revocations the
    document carries are always kept. ``skipped`` receives the sections the document carries but the
    write leaves alone."""
    def plan(has_policy: bool) -> list[Any]:
        chosen = dict(document)
        if has_policy:
            named = sections if sections is not None else frozenset(IMPORT_SECTIONS) - {"api_keys"}
            chosen = {k: v for k, v in document.items() if k in named or k == "revoked_api_keys"}
        if skipped is not None:
            skipped[:] = [name for name in IMPORT_SECTIONS if name in document and name not in chosen]
        return policy_ops(chosen)

    return plan


def _min_score(raw: str | None) -> float:
    if raw is None:
        return 0.5
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:  # also refuses NaN
        raise invalid("min_score", "must be a number from 0 to 1")
    return value


async def _screening_section(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``screening`` section of a policy document: ``{"entries": [...]}``, read like an import."""
    _object(dict(section), ("entries",), "screening")
    entries = section.get("entries", [])
    if not isinstance(entries, list):
        raise invalid("screening.entries", "must be a list of screening entries")
    if not entries:
        return []
    document = orjson.dumps({"entries": entries})
    try:
        return await asyncio.to_thread(parse_csl, document, content_type="application/json")
    except ScreeningFormatError as exc:
        raise invalid("screening", str(exc)) from None


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _http_error(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own refusals (no route, wrong method, body too large) in the contract's shape."""
    status = exc.status if 400 <= exc.status < 600 else 500
    messages = {404: "No such admin endpoint.",
                405: f"Method not allowed here; allowed: {exc.headers.get('Allow', '')}.",
                413: "The request body is too large."}
    headers = tuple((name, value) for name, value in exc.headers.items() if name.lower() == "allow")
    return GatewayError(status, _HTTP_CODES.get(status, "invalid_request"),
                        messages.get(status, exc.reason or "The request was refused."), headers=headers)


def register_admin_routes(app: web.Application, gateway: Gateway) -> None:
    """Mount ``/admin/v1`` on the admin listener, behind the error and token middlewares."""
    api = AdminApi(gateway)
    app.middlewares.extend([api.errors, api.authenticate])
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
    routes.add_get(f"{PREFIX}/audit", api.audit)
    routes.add_get(f"{PREFIX}/changes", api.changes)
