"""The contract's errors, in one place for every listener: the error table (domain exception type ->
contract code and status), the error bodies and headers, and how the public listener presents a
refusal (``block_style``, the ``Link: rel="blocked-by"`` header on 451, rate headers).

The public path, the admin error middleware and the listeners' parser-level refusals all turn a
failure into a response here; none of them maps an exception type or status of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .identity import AuthError
from .policy.validate import PolicyValidationError
from .screening import ScreeningFormatError
from .storage.ops import (
    ApprovalSelf,
    ChangeClosed,
    ChangeConflict,
    ChangeExpired,
    ChangeRequestMissing,
    KeyRevoked,
    NotFound,
    PolicyIncomplete,
    PolicyMissing,
)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    451: "legal_block",
    500: "api_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


class BackendUnavailable(Exception):
    """Storage (Redis) did not answer in time or could not be reached.

    A domain error, not the storage layer's: the rate limiter falls back on it without importing
    storage, and ``gateway.storage`` raises its subclass ``StoreUnavailable``.
    """


DECISION_OF_STATUS: dict[int, str] = {401: "block", 403: "block", 451: "block", 503: "block", 429: "rate_limit"}


def decision_label(status: int) -> str:
    """The metrics/audit ``decision`` for a gateway-made status (contract §9)."""
    return DECISION_OF_STATUS.get(status, "error")


@dataclass(slots=True)
class GatewayError(Exception):
    """A response the gateway makes itself instead of proxying."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    error_type: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


# The longest message an error body carries. Builders repeat at most 256 bytes of any one caller value
# (policy.clip); this bound holds for every message, whatever its builder, so no answer amplifies input.
MAX_MESSAGE_BYTES = 1024


def bounded_message(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE_BYTES` UTF-8 bytes (whole characters), marked with "..." if cut."""
    if len(message) <= MAX_MESSAGE_BYTES // 4:
        return message
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


def error_body(status: int, code: str, message: str, request_id: str, error_type: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": bounded_message(message),
                "type": error_type or ERROR_TYPES.get(status, "api_error"),
                "code": code,
                "request_id": request_id,
            }
        }
    )


def error_response(
    err: GatewayError, *, request_id: str, policy_version: int, reason: str | None = None
) -> web.Response:
    """The JSON error response with the contract's gateway headers."""
    response = web.Response(
        status=err.status,
        body=error_body(err.status, err.code, err.message, request_id, err.error_type),
        content_type="application/json",
    )
    headers = response.headers
    headers["X-Request-Id"] = request_id
    headers["X-Gateway-Reason"] = reason or err.code
    headers["X-Gateway-Policy-Version"] = str(policy_version)
    for name, value in err.headers:
        headers.add(name, value)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, code, message)


def ambiguous_request(message: str) -> GatewayError:
    """400: the request could be read two ways (docs/contract.md §4a), so it is read neither way."""
    return GatewayError(400, "ambiguous_request", message)


def unsupported_media_type(message: str) -> GatewayError:
    """415: a body in a media type or content coding the gateway does not decide on."""
    return GatewayError(415, "unsupported_media_type", message)


def method_not_allowed(method: str) -> GatewayError:
    return GatewayError(
        405,
        "method_not_allowed",
        f"The method {method} is not allowed through this gateway.",
        headers=(("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),),
    )


def request_timeout(seconds: float) -> GatewayError:
    return GatewayError(408, "request_timeout", f"The request body did not arrive within {seconds:g} s.")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


# --- the contract's errors, by name -----------------------------------------------------------


def unauthenticated(message: str) -> GatewayError:
    """401 (row 1): no verified caller; ``message`` never holds the credential."""
    return GatewayError(401, "unauthenticated", message)


def policy_stale() -> GatewayError:
    """503 (row 10): the public listener admits nothing while its policy is unconfirmed."""
    return GatewayError(
        503,
        "policy_stale",
        "The gateway cannot confirm its export-control policy; no request is admitted until it can.",
    )


def storage_unavailable() -> GatewayError:
    """503 on the admin API: Redis did not answer, so nothing was written."""
    return GatewayError(503, "redis_unavailable", "Redis is unavailable; nothing was changed. Retry when it is back.")


def internal_error(request_id: str | None = None) -> GatewayError:
    """500: an unexpected failure; with ``request_id``, the answer names the log line to look for."""
    if request_id is None:
        return GatewayError(500, "internal_error", "The gateway failed to handle the request.")
    return GatewayError(
        500, "internal_error", f"The gateway failed to handle this request; see its log for request id {request_id}."
    )


def malformed_request() -> GatewayError:
    """400 for a request the HTTP parser refused; never echoes the parser's message (it quotes the
    caller's bytes, credentials included)."""
    return bad_request("The HTTP request is malformed.")


def invalid(field: str, message: str) -> GatewayError:
    return bad_request(f"{field}: {message}")


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found", message)


def policy_missing(*, read: bool = False) -> GatewayError:
    if read:
        return GatewayError(
            409,
            "policy_missing",
            "No policy is loaded: Redis holds none (emptied, or restarted without its "
            "data), so there is nothing to show and every caller is answered 503 "
            "policy_stale. Restore a whole policy from a backup: gateway policy import "
            "BACKUP.yaml (PUT /admin/v1/policy with every section).",
        )
    return GatewayError(
        409,
        "policy_missing",
        "Redis holds no policy: restore one with PUT /admin/v1/policy (gateway policy "
        "import FILE) before changing single entries.",
    )


def policy_incomplete(missing: Sequence[str]) -> GatewayError:
    return GatewayError(
        409,
        "policy_incomplete",
        f"Redis holds no policy, so this import is a restore and must carry every "
        f"section; missing: {', '.join(missing)} (write an empty one as empty, e.g. "
        f"partners: {{}}, screening: {{entries: []}}). Nothing was written; `gateway "
        f"policy export` writes a complete file.",
    )


def key_revoked(exc: KeyRevoked) -> GatewayError:
    record = exc.revoked
    return GatewayError(
        409,
        "key_revoked",
        f"API key {exc.key_id!r} was revoked at {record.get('revoked_at')} by "
        f"{record.get('revoked_by')}; a revoked key (its id or its hash) is never made "
        "active again. Nothing was changed; issue a new key with POST /admin/v1/api-keys.",
        error_type="invalid_request_error",
    )


def approval_self(request_id: str) -> GatewayError:
    """403: the two-person rule: a change request is approved by someone other than its proposer."""
    return GatewayError(
        403,
        "approval_self",
        f"Change request {request_id} was proposed with this admin token; another admin must approve it "
        "(its proposer may reject it to withdraw it).",
    )


def change_closed(exc: ChangeClosed) -> GatewayError:
    return GatewayError(
        409,
        "change_closed",
        f"Change request {exc.request_id} is {exc.status}, no longer pending; nothing was changed.",
    )


def change_expired(exc: ChangeExpired) -> GatewayError:
    return GatewayError(
        409,
        "change_expired",
        f"Change request {exc.request_id} expired before it was approved; nothing was changed. Propose it again.",
    )


def change_conflict(exc: ChangeConflict) -> GatewayError:
    changed = ", ".join(exc.changed[:5]) + (f" and {len(exc.changed) - 5} more" if len(exc.changed) > 5 else "")
    return GatewayError(
        409,
        "change_conflict",
        f"What change request {exc.request_id} changes was changed since it was proposed ({changed}); "
        "nothing was changed. Reject it and propose the change again against the policy as it is now.",
    )


def screening_match(field: str) -> GatewayError:
    """An API key refused at issuance: its organisation screens as a match (docs/contract.md §14).
    Like the public listener's refusal, it names the rule, not the listed entry or the score."""
    return GatewayError(
        409,
        "screening_match",
        f"{field}: the organisation matches the denied-party screening list, so no API key is issued "
        "for it. Nothing was changed; check the match with gateway screening search.",
        error_type="invalid_request_error",
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def http_error(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own refusals (no route, wrong method, body too large) in the contract's shape."""
    status = exc.status if 400 <= exc.status < 600 else 500
    messages = {
        404: "No such admin endpoint.",
        405: f"Method not allowed here; allowed: {exc.headers.get('Allow', '')}.",
        413: "The request body is too large.",
    }
    headers = tuple((name, value) for name, value in exc.headers.items() if name.lower() == "allow")
    return GatewayError(
        status,
        _HTTP_CODES.get(status, "invalid_request"),
        messages.get(status, exc.reason or "The request was refused."),
        headers=headers,
    )


# --- the error table ----------------------------------------------------------------------------

# Domain exception type -> the contract error it is answered with. Looked up along the exception's
# MRO, so a subclass (``storage.clients.StoreUnavailable`` of :class:`BackendUnavailable`) is answered
# as its base unless it has an entry of its own. No two entries are related by subclassing, so the
# order of entries does not matter.
ERROR_TABLE: dict[type[BaseException], Callable[[Any], GatewayError]] = {
    GatewayError: lambda err: err,
    AuthError: lambda exc: unauthenticated(exc.message),
    PolicyValidationError: lambda exc: invalid(exc.field or "body", exc.message),
    ScreeningFormatError: lambda exc: bad_request(str(exc)),
    PolicyMissing: lambda _exc: policy_missing(),
    PolicyIncomplete: lambda exc: policy_incomplete(exc.missing),
    KeyRevoked: key_revoked,
    ChangeRequestMissing: lambda exc: not_found(f"No change request {str(exc)[:80]!r}."),
    ApprovalSelf: lambda exc: approval_self(str(exc)[:80]),
    ChangeClosed: change_closed,
    ChangeExpired: change_expired,
    ChangeConflict: change_conflict,
    NotFound: lambda exc: not_found(f"No entry {str(exc)[:80]!r} to change or delete."),
    BackendUnavailable: lambda _exc: storage_unavailable(),
    web.HTTPException: http_error,
}


def error_for(exc: BaseException) -> GatewayError | None:
    """The contract error ``exc`` is answered with, or None when it is no domain error (a bug: 500)."""
    for kind in type(exc).__mro__:
        make = ERROR_TABLE.get(kind)
        if make is not None:
            return make(exc)
    return None


# --- presentation on the public listener --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Presentation:
    """How the public listener presents its refusals (``policy.block_style``, ``policy.blocked_by_url``)."""

    block_style: str = "rfc7725"
    blocked_by_url: str | None = None

    def response(
        self,
        err: GatewayError,
        *,
        request_id: str,
        policy_version: int,
        rate_headers: Iterable[tuple[str, str]] | None = None,
    ) -> web.Response:
        """``err`` as the caller gets it; ``rate_headers`` (the caller's limits) go on every answer but a 429,
        which carries its own. ``X-Gateway-Reason`` keeps the gateway's code whatever the style."""
        reason = err.code
        if err.code == "country_denied" and self.block_style == "openai":
            err = GatewayError(
                403,
                "unsupported_country_region_territory",
                "Country, region, or territory not supported",
                headers=err.headers,
                error_type="request_forbidden",
            )
        headers = err.headers
        if err.status == 451 and self.blocked_by_url:
            headers = (*headers, ("Link", f'<{self.blocked_by_url}>; rel="blocked-by"'))
        if rate_headers is not None and err.status != 429:
            headers = (*headers, *rate_headers)
        err.headers = headers
        response = error_response(err, request_id=request_id, policy_version=policy_version, reason=reason)
        if err.status == 408:
            response.force_close()  # the rest of a body that came too slowly is not waited for
        return response
