"""The forwarder's HTTP/1.1 client: pooled keep-alive connections to the model servers.

The admitted request is written as one buffer, its head built here from the canonical view
(request_model.py) and nothing else, and the answer is parsed by llhttp (httptools). aiohttp's
client does the same job with several layers the hot path does not need (cookie jars, redirects,
tracing, payload registries), which cost more CPU per request than all of the gateway's own
admission work; the rest of the gateway (JWKS, the model list) keeps using it.

What the relay needs of an answer: its status, reason and headers, its body as a stream of chunks
that reports a cut connection, a malformed chunk or a read timeout as an error, and a connection
that is reused only when the answer ended exactly where its framing said (never with bytes left
over, never after an error, an upgrade or a caller that went away).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Bounds on an answer's head (what aiohttp's client enforces by default): a line or field of at most
# 8190 bytes, at most 128 fields, and the head as a whole within 64 KiB however it is cut.
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 * 1024
# Buffered body bytes past which the socket stops being read until the caller takes them.
HIGH_WATER = 256 * 1024
# Idle keep-alive connections older than this are closed rather than reused (the model server may
# have timed them out already; aiohttp's connector uses the same 15 s).
KEEPALIVE_S = 15.0
_LOST = "The connection to the model server was lost before the response was complete."
# Methods whose empty body is sent without Content-Length (as aiohttp does).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The model server could not be asked or did not answer with a usable response."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened to the model server."""


class UpstreamProtocolError(UpstreamError):
    """The model server's answer broke HTTP/1.1 (or the connection closed) before its head ended."""


class UpstreamPayloadError(UpstreamError):
    """The answer's body broke off: a cut connection, a malformed chunk."""


class UpstreamTimeoutError(TimeoutError):
    """The model server sent nothing for longer than the read timeout (or did not accept the connection)."""


class _Leftover(Exception):
    """Raised by the parser callbacks when bytes follow a complete answer (stops the parse)."""


class Body:
    """An answer's body as it arrives: chunks in order, then the end or the error that stopped it."""

    __slots__ = ("_chunks", "_connection", "_eof", "_exc", "_size", "_waiter")

    def __init__(self, connection: UpstreamConnection | None) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._connection = connection

    def is_eof(self) -> bool:
        return self._eof

    def exception(self) -> BaseException | None:
        return self._exc

    def set_exception(self, exc: BaseException) -> None:
        """End the body with ``exc``: the reader gets it at its next read (inflight.py ends streams so)."""
        if self._exc is None:
            self._exc = exc
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._connection is not None:
            self._connection.pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Every chunk as it comes; raises the error that stopped the body, if one did."""
        while True:
            if self._exc is not None:
                raise self._exc
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._size -= len(chunk)
                if self._size <= HIGH_WATER // 2 and self._connection is not None:
                    self._connection.resume()
                yield chunk
                continue
            if self._eof:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class UpstreamResponse:
    """One answer's head and body; :meth:`release` when done with it (or :meth:`close` to drop the connection)."""

    __slots__ = ("_connection", "content", "content_length", "headers", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: CIMultiDictProxy[str], content: Body, connection: UpstreamConnection
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._connection = connection

    def release(self) -> None:
        """Give the connection back to its pool if the answer ended cleanly; close it otherwise."""
        connection, self._connection = self._connection, None  # type: ignore[assignment]
        if connection is not None:
            connection.finish()

    def close(self) -> None:
        """Drop the connection (the model server sees the request end); it is never reused."""
        connection, self._connection = self._connection, None  # type: ignore[assignment]
        if connection is not None:
            connection.abort()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a model server, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self.pool = pool
        self.loop = loop
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.reusable = False  # set when an exchange ends exactly at its framing's end
        self.closed = False
        self.idle_since = 0.0
        self._busy = False
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._ready: UpstreamResponse | None = None  # parsed, handed over when its packet has parsed
        self._body: Body | None = None
        self._complete = False
        self._head_bytes = 0
        self._no_body = False
        self._interim = False
        self._reason: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._status = 0
        self._until_close = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False

    # --- transport events ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._stop_timer()
        self.pool.lost(self)
        if not self._busy or self._complete:
            return
        head = self._head
        if head is not None and not head.done():
            head.set_exception(UpstreamProtocolError("The model server closed the connection before answering."))
            return
        body = self._body
        if body is not None and not body.is_eof():
            if self._until_close and exc is None:
                self._complete = True
                body.feed_eof()  # a body framed by the connection's end has ended
            else:
                body.set_exception(
                    UpstreamPayloadError(
                        "The connection to the model server was lost before the response was complete."
                    )
                )

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._complete or self._parser is None:
            # Bytes nobody asked for (after an answer ended, or between exchanges): the connection's
            # framing can no longer be trusted, so it is never reused.
            self.reusable = False
            self._drop()
            return
        self._last_read = self.loop.time()
        head_pending = self._head is not None
        try:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if not isinstance(exc.__context__, _Leftover):
                    raise
                self.reusable = False  # closed when the relay is done with the answer
            ready = self._ready
            if ready is None:
                if head_pending:
                    self._head_bytes += len(data)
                    if self._head_bytes > MAX_HEAD_BYTES:  # however it is cut, a head ends within the bound
                        self._fail(UpstreamProtocolError("The model server's response head is too large."))
            else:
                # The head is handed over only once all bytes that came with it parsed: an error
                # later in the same packet (a malformed first chunk) is still an unusable answer.
                self._ready = None
                head, self._head = self._head, None
                if head is not None and not head.done():
                    head.set_result(ready)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("The model server switched protocols."))
        except (httptools.HttpParserError, UpstreamError) as exc:
            if isinstance(exc, httptools.HttpParserCallbackError) and isinstance(exc.__context__, UpstreamError):
                exc = exc.__context__
            self._fail(exc if isinstance(exc, UpstreamError) else UpstreamProtocolError(str(exc)))

    # --- parser callbacks (httptools) ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Leftover  # bytes after the answer: it stands, the connection goes
        self._reason = []
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason.append(reason)
        if sum(map(len, self._reason)) > MAX_FIELD_BYTES:
            raise UpstreamProtocolError("The model server's status line is too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise UpstreamProtocolError("The model server's response has too many header fields.")
        if len(name) + len(value) > MAX_FIELD_BYTES:
            raise UpstreamProtocolError("A header field of the model server's response is too long.")
        headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 1xx: not the answer; the final one follows on this connection
            return
        self._interim = False
        self._status = status
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        self._until_close = (
            not self._no_body
            and status not in (204, 304)
            and "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
        )
        self._body = body = Body(self)
        reason = b"".join(self._reason).decode("utf-8", "surrogateescape")
        response = UpstreamResponse(status, reason, headers, body, self)
        self.reusable = parser.should_keep_alive() and not self._until_close and status != 101
        if self._no_body:
            self._complete = True
            body.feed_eof()
        self._ready = response

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None and not self._complete:
            body.feed(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._complete:
            return  # a HEAD answer's framing, already ended at its head
        self._complete = True
        self._stop_timer()
        if self._body is not None:
            self._body.feed_eof()

    # --- one exchange ----------------------------------------------------------------------------

    def begin(self, head_and_body: bytes, *, no_body: bool) -> asyncio.Future[UpstreamResponse]:
        """Send one request; the future gets the answer's head."""
        self._busy = True
        self._complete = False
        self._no_body = no_body
        self._interim = False
        self._head_bytes = 0
        self._body = None
        self._ready = None
        self._parser = httptools.HttpResponseParser(self)
        self._head = head = self.loop.create_future()
        self._last_read = self.loop.time()
        self._timer = self.loop.call_at(self._last_read + self.read_timeout_s, self._check_timeout)
        assert self.transport is not None
        self.transport.write(head_and_body)
        return head

    def finish(self) -> None:
        """The relay is done with the answer: back to the pool if it ended cleanly, else closed."""
        self._stop_timer()
        self._busy = False
        self._parser = None
        self._body = None
        if self._complete and self.reusable and not self.closed and not self._paused:
            self.pool.put(self)
        else:
            self._drop()

    def abort(self) -> None:
        self._busy = False
        self._stop_timer()
        self._drop()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_read = self.loop.time()  # time the caller took is not the model server's silence
            self.transport.resume_reading()

    # --- internals ----------------------------------------------------------------------------------

    def _check_timeout(self) -> None:
        self._timer = None
        if not self._busy or self._complete:
            return
        due = self._last_read + self.read_timeout_s
        now = self.loop.time()
        if self._paused or now < due:
            self._timer = self.loop.call_at(max(due, now + 0.05), self._check_timeout)
            return
        self._fail(UpstreamTimeoutError("The model server sent nothing within the read timeout."))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        self.reusable = False
        self._ready = None
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._body is not None and not self._complete:
            self._body.set_exception(
                exc
                if isinstance(exc, TimeoutError)
                else UpstreamPayloadError("The model server broke off the response.")
            )
        self._complete = True
        self._stop_timer()
        self._drop()

    def _drop(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections per model server (scheme, host, port), at most ``limit`` open at once."""

    def __init__(self, *, limit: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, str, int], collections.deque[UpstreamConnection]] = {}
        self._keys: dict[UpstreamConnection, tuple[str, str, int]] = {}
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        base: Origin,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> UpstreamResponse:
        """Send one request to ``base`` and return the answer's head (its body still streaming)."""
        data = base.serialize(method, target, headers, body)
        connection = await self._acquire(base)
        try:
            return await connection.begin(data, no_body=method == "HEAD")
        except BaseException:
            connection.abort()
            raise

    async def _acquire(self, origin: Origin) -> UpstreamConnection:
        idle = self._idle.get(origin.key)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                connection = idle.pop()
                if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                    return connection
                connection.abort()
        while self._open >= self.limit:
            # Every place is taken: an idle connection to another model server gives its place up
            # (its close frees it, and wakes a waiter), so one server's idle pool cannot starve another.
            self._close_one_idle()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            idle = self._idle.get(origin.key)
            while idle:
                connection = idle.pop()
                if not connection.closed:
                    return connection
        return await self._connect(origin)

    def _close_one_idle(self) -> None:
        for idle in self._idle.values():
            while idle:
                connection = idle.popleft()  # the longest idle
                if not connection.closed:
                    connection.abort()
                    return

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _transport, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, loop, self.read_timeout_s),
                    origin.host,
                    origin.port,
                    ssl=self._tls() if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError as exc:
            self._opened_failed()
            raise UpstreamTimeoutError("The model server did not accept a connection in time.") from exc
        except (OSError, ssl.SSLError) as exc:
            self._opened_failed()
            raise UpstreamConnectError(f"Cannot connect to the model server: {exc}") from exc
        except BaseException:
            self._opened_failed()
            raise
        self._keys[connection] = origin.key
        return connection

    def _opened_failed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put(self, connection: UpstreamConnection) -> None:
        key = self._keys.get(connection)
        if key is None or self._closed:
            connection.abort()
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(key, collections.deque()).append(connection)
        self._wake_one()

    def lost(self, connection: UpstreamConnection) -> None:
        """A connection closed (either side): its place is free; an idle one is skipped when next met."""
        if self._keys.pop(connection, None) is not None:
            self._open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection (the app's shutdown)."""
        self._closed = True
        for connection in list(self._keys):
            connection.abort()
        self._idle.clear()
        await asyncio.sleep(0)


class Origin:
    """A model server's scheme, host and port, and the ``Host`` its requests carry."""

    __slots__ = ("_host_line", "host", "key", "port", "prefix", "tls")

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.tls = parts.scheme == "https"
        host = parts.hostname or ""
        self.host = host
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (parts.scheme, host, self.port)
        # A base URL with a path (``http://host/openai``) puts it before every request's target.
        self.prefix = parts.path.rstrip("/")
        shown = f"[{host}]" if ":" in host else host
        default = 443 if self.tls else 80
        self._host_line = f"Host: {shown}\r\n" if self.port == default else f"Host: {shown}:{self.port}\r\n"

    def serialize(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        """The request as one buffer: its line, ``Host``, the computed headers, the length, the body."""
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # One line per field: a CR or LF inside a name or value would start a field of its own.
        if fields.count("\r") != len(headers) or fields.count("\n") != len(headers):
            raise UpstreamProtocolError("A request header holds a line break.")
        length = f"Content-Length: {len(body)}\r\n" if body or method not in _NO_BODY_METHODS else ""
        head = f"{method} {self.prefix}{target} HTTP/1.1\r\n{self._host_line}{fields}{length}\r\n"
        encoded = head.encode("utf-8", "surrogateescape")
        return encoded + body if body else encoded


_ORIGINS: dict[str, Origin] = {}


def origin(base: str) -> Origin:
    """The :class:`Origin` of a base URL (``upstream.url`` or a route's), parsed once."""
    found = _ORIGINS.get(base)
    if found is None:
        found = _ORIGINS[base] = Origin(base)
    return found
