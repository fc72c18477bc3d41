"""The admin API's failures as contract error bodies: the errors handlers raise and the middleware
that turns every exception (domain, validation, aiohttp's own refusals) into one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import GatewayError, bad_request, error_response
from ..logs import request_id_for
from ..policy.validate import PolicyValidationError
from ..screening import ScreeningFormatError
from ..storage.clients import StoreUnavailable
from ..storage.ops import KeyRevoked, NotFound, PolicyIncomplete, PolicyMissing

log = logging.getLogger("gateway.admin")

REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("admin_request_id", str)


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


def error_middleware(policy_version: Callable[[], int]) -> Middleware:
    """The outermost admin middleware; error bodies carry ``policy_version()``."""

    def _error(err: GatewayError, request_id: str) -> web.Response:
        return error_response(err, request_id=request_id, policy_version=policy_version())

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure ends as a contract error body; nothing escapes as aiohttp's HTML page."""
        request_id = request_id_for(request.headers.get("X-Request-Id"))
        request[REQUEST_ID_KEY] = request_id
        try:
            response = await handler(request)
        except GatewayError as err:
            response = _error(err, request_id)
        except PolicyValidationError as exc:
            response = _error(invalid(exc.field or "body", exc.message), request_id)
        except ScreeningFormatError as exc:
            response = _error(bad_request(str(exc)), request_id)
        except PolicyMissing:
            response = _error(policy_missing(), request_id)
        except PolicyIncomplete as exc:
            response = _error(policy_incomplete(exc.missing), request_id)
        except KeyRevoked as exc:
            response = _error(key_revoked(exc), request_id)
        except NotFound as exc:
            response = _error(not_found(f"No entry {str(exc)[:80]!r} to change or delete."), request_id)
        except StoreUnavailable as exc:
            log.warning("admin request failed: %s", exc)
            response = _error(GatewayError(503, "redis_unavailable",
                                           "Redis is unavailable; nothing was changed. Retry "
                                           "when it is back."), request_id)
        except web.HTTPException as exc:
            response = _error(_http_error(exc), request_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin request failed", extra={"request_id": request_id, "path": request.path})
            response = _error(GatewayError(500, "internal_error",
                                           "The gateway failed to handle this request; see its log "
                                           f"for request id {request_id}."), request_id)
        response.headers["X-Request-Id"] = request_id
        return response

    return errors


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
