"""aiohttp's private names that gateway/listener.py and gateway/proxy.py build on, checked where they stand.

aiohttp is pinned below its next minor (pyproject.toml); these are the names a minor release may move or
change without notice. When an upgrade fails here, read the listener's or the proxy's use of the name
before raising the pin: the JSON answers to unparseable requests, the body-error handling and the cut
connection after a started response depend on them.
"""

from __future__ import annotations

import dataclasses
import inspect

import aiohttp
from aiohttp import http_exceptions, http_writer, web, web_protocol, web_request, web_runner
from aiohttp.web_response import StreamResponse


def parameters(function: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_aiohttp_is_the_minor_the_pin_allows() -> None:
    major, minor = (int(part) for part in aiohttp.__version__.split(".")[:2])
    assert (major, minor) == (3, 14), "raise the pin in pyproject.toml only after this file passes"


# --- listener.py --------------------------------------------------------------------------------


def test_request_handler_keeps_its_message_queue_and_current_request() -> None:
    """_JsonErrorRequestHandler.data_received reads ``_current_request``, ``_messages`` and ``_manager``."""
    handler = web_protocol.RequestHandler
    slots = set(getattr(handler, "__slots__", ()))
    for name in ("_current_request", "_messages", "_manager"):
        assert name in slots, f"RequestHandler.{name} is gone"
    assert callable(handler.data_received) and callable(handler.close)
    # The queue holds (message or _ErrInfo, payload) pairs; the listener pops an _ErrInfo off its end.
    source = inspect.getsource(handler.__init__)
    assert "self._messages" in source and "deque(" in source


def test_err_info_is_a_record_of_status_exception_and_message() -> None:
    info = web_protocol._ErrInfo
    assert dataclasses.is_dataclass(info) or hasattr(info, "__attrs_attrs__")
    fields = (
        {field.name for field in dataclasses.fields(info)}
        if dataclasses.is_dataclass(info)
        else {attribute.name for attribute in info.__attrs_attrs__}
    )  # type: ignore[attr-defined]
    assert {"status", "exc", "message"} <= fields
    made = info(status=400, exc=http_exceptions.BadHttpMessage("x"), message="x")
    assert isinstance(made.exc, http_exceptions.BadHttpMessage)


def test_handle_error_keeps_its_signature() -> None:
    """The listener overrides ``handle_error(request, status, exc, message)`` and aiohttp calls it so."""
    assert list(parameters(web_protocol.RequestHandler.handle_error)) == ["self", "request", "status", "exc", "message"]


def test_request_handler_is_built_from_a_server_and_its_kwargs() -> None:
    """JsonErrorServer.__call__ builds ``RequestHandler(self, loop=self._loop, **self._kwargs)``."""
    init = parameters(web_protocol.RequestHandler.__init__)
    assert list(init)[:2] == ["self", "manager"]
    assert init["loop"].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("lingering_time", "keepalive_timeout"):
        assert name in init, f"RequestHandler no longer takes {name}"
    source = inspect.getsource(web.Server.__init__)
    for name in ("self._loop", "self._kwargs", "self.request_handler", "self.request_factory"):
        assert name in source, f"web.Server no longer sets {name}"
    assert "request_factory" in parameters(web.Server.__init__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in inspect.getsource(web.Server.__call__)


def test_app_runner_makes_its_server_in_make_server() -> None:
    """JsonErrorAppRunner overrides ``_make_server`` and passes the runner's ``_kwargs`` on."""
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    assert "self._kwargs" in inspect.getsource(web_runner.BaseRunner.__init__)
    assert "self._server = await self._make_server()" in inspect.getsource(web_runner.BaseRunner.setup)


def test_a_request_writer_counts_its_output() -> None:
    """handle_error refuses to answer once ``request.writer.output_size`` shows a started response."""
    assert http_writer.StreamWriter.output_size == 0  # counted up from zero as the response is written
    assert isinstance(inspect.getattr_static(web_request.BaseRequest, "writer"), property)


# --- proxy.py -----------------------------------------------------------------------------------


def test_stream_response_keeps_its_request() -> None:
    """Proxy._abort_stream cuts the connection through ``response._req.transport``."""
    assert "_req" in StreamResponse.__annotations__
    assert "self._req = request" in inspect.getsource(StreamResponse._start)
    assert hasattr(web_request.BaseRequest, "transport")


def test_a_stream_response_can_hold_its_head_for_the_first_body_bytes() -> None:
    """proxy.CoalescedResponse sets ``_send_headers_immediately = False`` so the head leaves with the body."""
    assert StreamResponse._send_headers_immediately is True
    assert "self._send_headers_immediately" in inspect.getsource(StreamResponse._write_headers)
    assert "_send_headers_with_payload" in inspect.getsource(http_writer.StreamWriter.write)


def test_body_streams_take_an_exception_and_an_end() -> None:
    """Both modules fail a body stream with ``set_exception`` and end it with ``feed_eof``."""
    for name in ("set_exception", "exception", "is_eof", "feed_eof"):
        assert callable(getattr(aiohttp.StreamReader, name)), f"StreamReader.{name} is gone"
