"""A lean, pipelined RESP connection for the store's hot-path script calls.

redis-py costs about 150 µs of CPU per command on this kind of machine, more
than the whole rest of a request; this connection costs a tenth of that. It
does one thing: send commands in order, match replies in order (hiredis parses
them), and batch every command issued in one event-loop tick into one write.
Replies always pair with the command that asked, even when callers give up
(time out or are cancelled): a waiter is never removed out of order, so the
stream cannot desynchronise. A connection that stops answering is closed,
failing everything pending, and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis


class WireError(Exception):
    """The connection failed or was closed; the command's outcome is unknown."""


class DeadlineExceeded(WireError):
    """No reply within the connection's deadline: the server is slow, frozen or blackholed."""


class ReplyError(Exception):
    """Redis answered the command with an error reply (e.g. NOSCRIPT)."""


def pack(*args: bytes | str | int | float) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _expire(future: asyncio.Future[Any]) -> None:
    """A call's own deadline passed: its caller falls back; the reply, when it comes, is dropped in order."""
    if not future.done():
        future.set_exception(DeadlineExceeded("no reply within the request's deadline"))
        future.exception()  # a caller that was cancelled will never read it


class _Protocol(asyncio.Protocol):
    """Replies pair with waiters in order; at most one batch is on the wire at a time.

    While a batch is out, new commands queue and leave together when its last
    reply arrives: an idle connection sends at once (low latency), a busy one
    sends ever larger batches (few system calls per command).
    """

    def __init__(self, deadline_s: float) -> None:
        self.reader = hiredis.Reader()
        # (future, when queued, the timer of a per-call deadline or None)
        self.waiters: deque[tuple[asyncio.Future[Any], float, asyncio.TimerHandle | None]] = deque()
        self.unsent: list[bytes] = []
        self.in_flight = 0
        self.flush_scheduled = False
        self.transport: asyncio.Transport | None = None
        # Kept: asking asyncio for the running loop costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.deadline_s = deadline_s
        self.watchdog: asyncio.TimerHandle | None = None
        # When the server last showed it is alive: a batch sent with nothing out, or bytes received.
        self.last_heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def queue(self, payload: bytes, deadline: float | None = None) -> asyncio.Future[Any]:
        """The future of one command's reply; ``deadline`` (loop time): fail it then, connection kept."""
        if self.closed:
            raise WireError("connection closed")
        loop = self.loop
        future: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        timer = None if deadline is None else loop.call_at(deadline, _expire, future)
        self.waiters.append((future, now, timer))
        self.unsent.append(payload)
        if not self.in_flight and not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        if self.watchdog is None:
            self.watchdog = loop.call_at(now + self.deadline_s / 4, self._check_deadline)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.unsent or self.in_flight or self.closed or self.transport is None:
            return
        self.in_flight = len(self.unsent)
        self.last_heard = self.loop.time()
        self.transport.write(b"".join(self.unsent))
        self.unsent.clear()

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(WireError(f"protocol error: {exc}"))
                return
            if reply is False:
                break
            if not self.in_flight or not self.waiters:  # a reply nobody asked for: the stream is not trustworthy
                self._fail(WireError("unexpected reply"))
                return
            self.in_flight -= 1
            future, _queued, timer = self.waiters.popleft()
            if timer is not None:
                timer.cancel()
            if future.done():  # its caller gave up (or its deadline passed); the reply still belongs to it
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)
        if not self.in_flight and self.unsent:
            self.flush()

    def _check_deadline(self) -> None:
        """Fail everything when the server went silent for the deadline with replies owed.

        Silence is measured from the server's side (the last bytes received, or the
        send of the batch it owes), not from when a command was queued: a process
        whose own event loop is saturated reads replies late, and that lag is no
        sign of a Redis fault; treating it as one would hand a burst to the local
        limiter. A hard cap of ten deadlines still bounds every wait.
        """
        self.watchdog = None
        if self.closed or not self.waiters:
            return
        loop = self.loop
        now = loop.time()
        _future, queued, _timer = self.waiters[0]
        silent = self.in_flight and now - self.last_heard > self.deadline_s
        if silent or now - queued > 10 * self.deadline_s:
            self._fail(DeadlineExceeded(f"no reply within {self.deadline_s:.3f}s; connection dropped"))
            return
        self.watchdog = loop.call_at(now + self.deadline_s / 4, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WireError(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiters:
            future, _queued, timer = self.waiters.popleft()
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.set_exception(error)
                future.exception()  # a caller that was cancelled will never read it
        self.unsent.clear()
        if self.transport is not None:
            self.transport.abort()


class RespConnection:
    """One lazily (re)connected RESP connection to a standalone Redis (``redis://``, ``rediss://``, ``unix://``).

    Every call is answered within ``deadline_s`` (plus a quarter of it): past that the
    connection is dropped and its callers get :class:`DeadlineExceeded`, so callers need
    no timer of their own.
    """

    def __init__(
        self, url: str, *, deadline_s: float, password: str | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parsed = urlparse(url)
        self.unix_path = unquote(parsed.path) if parsed.scheme == "unix" else None
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.db = int(parsed.path.strip("/") or 0) if parsed.scheme != "unix" else 0
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = password or (unquote(parsed.password) if parsed.password else None)
        self.ssl = ssl_context if parsed.scheme == "rediss" else None
        if parsed.scheme == "rediss" and self.ssl is None:
            self.ssl = ssl.create_default_context()
        self.deadline_s = deadline_s
        # A remote connect may need a few round trips (TLS); a dead host must not hold callers long.
        self.connect_timeout_s = max(2 * deadline_s, 0.25)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            if self.unix_path:
                _transport, protocol = await loop.create_unix_connection(
                    lambda: _Protocol(self.deadline_s), self.unix_path
                )
            else:
                _transport, protocol = await loop.create_connection(
                    lambda: _Protocol(self.deadline_s), self.host, self.port, ssl=self.ssl
                )
            handshake: list[bytes] = []
            if self.password:
                handshake.append(
                    pack("AUTH", self.username, self.password) if self.username else pack("AUTH", self.password)
                )
            if self.db:
                handshake.append(pack("SELECT", self.db))
            for command in handshake:
                await protocol.queue(command)
        return protocol

    async def _protocol_ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            # One connect for every caller waiting on it.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        except Exception as exc:
            raise WireError(f"connect failed: {type(exc).__name__}: {exc}") from exc
        return protocol

    def _connected(self, connecting: asyncio.Future[_Protocol]) -> None:
        # Runs even when every caller that waited for this connect was cancelled, so a
        # finished connect is never handed out again once its connection has dropped.
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._protocol = connecting.result()

    async def call(self, payload: bytes, *, deadline: float | None = None) -> Any:
        """Send one packed command and await its reply; raises WireError (DeadlineExceeded) or ReplyError.

        ``deadline`` (event-loop time): a caller with less time than the connection's deadline
        (what is left of a request's wait on Redis) gets DeadlineExceeded then. Only that call
        fails: its reply is still read and dropped in order, and the connection stays.
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            # The connect is shared (shielded); a caller waits for it no longer than for a reply.
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout_at(deadline if deadline is not None else loop.time() + self.deadline_s):
                    protocol = await self._protocol_ready()
            except TimeoutError as exc:
                raise DeadlineExceeded("no connection within the deadline") from exc
        return await protocol.queue(payload, deadline)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol._fail(WireError("closed"))
