"""The listeners' HTTP servers: contract bodies for parser errors, on the public and the admin port.

aiohttp answers requests it cannot parse (oversized headers, smuggling attempts,
bad chunking) itself, in plain text that echoes part of what was sent. Here
those answers get the contract's JSON body and headers instead, never echo the
request, and always close the connection.

A body that turns out malformed while the handler reads it (a bad chunk size
after good chunks) is reported to the handler as an error on the body stream,
answered once, and the connection closed: llhttp otherwise drops the body
stream without a word, so the handler would wait for bytes that never come and
the parser's own 400 would follow as a second, unasked-for response.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from .errors import error_response, internal_error, malformed_request
from .logs import request_id_for

log = logging.getLogger("gateway.listener")

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


class _JsonErrorRequestHandler(RequestHandler):
    def data_received(self, data: bytes) -> None:
        request = self._current_request
        if request is None:  # no body being read (a request arriving whole, the common case): aiohttp's own
            super().data_received(data)
            return
        payload = request.content
        queued = len(self._messages)
        super().data_received(data)
        if payload.is_eof():
            return
        if len(self._messages) > queued and isinstance(info := self._messages[-1][0], _ErrInfo):
            # The parser failed inside the body being read: that request answers it (400), not a second response.
            self._messages.pop()
            if payload.exception() is None:
                payload.set_exception(info.exc if info.exc is not None else BadHttpMessage("malformed body"))
        if payload.exception() is not None:
            payload.feed_eof()  # nothing more will come: no lingering read may wait for it
            self.close()  # and nothing after it on this connection is trusted

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        server: JsonErrorServer = self._manager  # type: ignore[assignment]
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if status >= 500:
            log.error("unhandled error in request handler", exc_info=exc)
            err = internal_error()
        else:
            log.debug("malformed request from %s: %s", request.remote, exc)
            err = malformed_request()  # never the parser's message: it quotes the caller's bytes
        server.on_rejected(err.status, err.code)
        response = error_response(err, request_id=request_id_for(None), policy_version=server.policy_version())
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """``web.Server`` whose connections answer unparseable requests with the contract's JSON body."""

    def __init__(
        self,
        handler: Handler,
        *,
        policy_version: Callable[[], int],
        on_rejected: Callable[[int, str], None],
        **kwargs: Any,
    ) -> None:
        # After an answer to a request whose body was not read to the end (413, a stalled or malformed body),
        # aiohttp keeps reading and discarding it so the caller sees the answer before the close; no longer
        # than a header may take to arrive.
        kwargs.setdefault("lingering_time", min(10.0, float(kwargs.get("keepalive_timeout", 10.0))))
        super().__init__(handler, **kwargs)
        self.policy_version = policy_version
        self.on_rejected = on_rejected

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """An ``AppRunner`` (the admin listener's router and middleware) whose connections answer
    unparseable requests as :class:`JsonErrorServer` does, instead of aiohttp's plain text."""

    def __init__(self, app: web.Application, *, policy_version: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._policy_version = policy_version

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts and freezes the application
        return JsonErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            policy_version=self._policy_version,
            on_rejected=_not_counted,
            **self._kwargs,
        )


def _not_counted(_status: int, _code: str) -> None:
    return None  # the request metrics count public requests only
