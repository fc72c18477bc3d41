"""The contract's error bodies and headers, made in one place for every gateway-made response."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

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


DECISION_OF_STATUS: dict[int, str] = {401: "block", 403: "block", 451: "block", 503: "block",
                                      429: "rate_limit"}


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
    return encoded[:MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


def error_body(status: int, code: str, message: str, request_id: str,
               error_type: str | None = None) -> bytes:
    return orjson.dumps({"error": {
        "message": bounded_message(message),
        "type": error_type or ERROR_TYPES.get(status, "api_error"),
        "code": code,
        "request_id": request_id,
    }})


def error_response(err: GatewayError, *, request_id: str, policy_version: int,
                   reason: str | None = None) -> web.Response:
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
    return GatewayError(405, "method_not_allowed", f"The method {method} is not allowed through this gateway.",
                        headers=(("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),))


def request_timeout(seconds: float) -> GatewayError:
    return GatewayError(408, "request_timeout",
                        f"The request body did not arrive within {seconds:g} s.")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
