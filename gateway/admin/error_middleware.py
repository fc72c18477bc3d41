"""The admin API's error middleware: every exception a handler raises (domain, validation, aiohttp's own
refusals) becomes a contract error body through the error table in gateway/errors.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import BackendUnavailable, GatewayError, error_for, error_response, internal_error
from ..logs import request_id_for

log = logging.getLogger("gateway.admin")

REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("admin_request_id", str)


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
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = error_for(exc)
            if err is None:
                log.exception("admin request failed", extra={"request_id": request_id, "path": request.path})
                err = internal_error(request_id)
            elif isinstance(exc, BackendUnavailable):
                log.warning("admin request failed: %s", exc)
            response = _error(err, request_id)
        response.headers["X-Request-Id"] = request_id
        return response

    return errors
