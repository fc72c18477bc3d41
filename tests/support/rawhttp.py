"""Raw-socket HTTP/1.1 for tests that must send what no client library would, and see every byte back.

``RawConnection`` is a blocking socket with a tiny response parser (Content-Length, chunked, or
read-until-close bodies); ``exchange`` sends bytes and collects every response until the server
closes. ``AsyncRawConnection`` does the same on asyncio streams, for tests that hold hundreds of
sockets at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

CRLF = b"\r\n"


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = b""
    version: str = "HTTP/1.1"

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def closes(self) -> bool:
        """The server said it closes the connection after this response."""
        tokens = ",".join(self.headers_named("Connection")).lower()
        return "close" in [t.strip() for t in tokens.split(",")] or self.version == "HTTP/1.0"


class Incomplete(Exception):
    """The buffer does not hold a whole response yet."""


class ProtocolViolation(Exception):
    """The bytes are not an HTTP/1.1 response."""


@dataclass
class ResponseParser:
    """Parses responses out of a growing buffer; ``head_only`` for answers to HEAD."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self, *, eof: bool, head_only: bool = False) -> RawResponse | None:
        try:
            response, used = _parse(bytes(self.buffer), eof=eof, head_only=head_only)
        except Incomplete:
            return None
        del self.buffer[:used]
        return response


def _parse(data: bytes, *, eof: bool, head_only: bool) -> tuple[RawResponse, int]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if eof and data:
            raise ProtocolViolation(f"truncated head: {data[:200]!r}")
        raise Incomplete
    head = data[:end]
    lines = head.split(CRLF)
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProtocolViolation(f"bad status line: {lines[0][:200]!r}")
    version, status = parts[0].decode(), int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolViolation(f"bad header line: {line[:200]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    start = end + 4
    names = {k.lower(): v for k, v in headers}
    if head_only or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, reason, headers, b"", head, version), start
    if "chunked" in names.get("transfer-encoding", "").lower():
        body, used = _dechunk(data, start, eof=eof)
        return RawResponse(status, reason, headers, body, head, version), used
    if "content-length" in names:
        length = int(names["content-length"])
        if len(data) - start < length:
            if eof:
                raise ProtocolViolation(f"body cut short: {len(data) - start} of {length} bytes")
            raise Incomplete
        return RawResponse(status, reason, headers, data[start : start + length], head, version), start + length
    if not eof:
        raise Incomplete  # delimited by the close
    return RawResponse(status, reason, headers, data[start:], head, version), len(data)


def _dechunk(data: bytes, pos: int, *, eof: bool) -> tuple[bytes, int]:
    body = bytearray()
    while True:
        line_end = data.find(CRLF, pos)
        if line_end < 0:
            break
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise ProtocolViolation(f"bad chunk size {size_text[:50]!r}") from exc
        chunk_start = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", line_end)
            if trailer_end == line_end:
                return bytes(body), line_end + 4
            if data[chunk_start : chunk_start + 2] == CRLF:
                return bytes(body), chunk_start + 2
            if trailer_end < 0:
                break
            return bytes(body), trailer_end + 4
        if len(data) < chunk_start + size + 2:
            break
        if data[chunk_start + size : chunk_start + size + 2] != CRLF:
            raise ProtocolViolation("chunk not followed by CRLF")
        body += data[chunk_start : chunk_start + size]
        pos = chunk_start + size + 2
    if eof:
        raise ProtocolViolation("chunked body cut short")
    raise Incomplete


class RawConnection:
    """One blocking TCP connection: send any bytes, read whole responses, see the close."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.parser = ResponseParser()
        self.eof = False
        self.reset = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once; False when the peer closed (FIN or RST)."""
        if self.eof:
            return False
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.parser.feed(data)
        return True

    def read_response(self, timeout: float | None = None, *, head_only: bool = False) -> RawResponse:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            response = self.parser.next(eof=self.eof, head_only=head_only)
            if response is not None:
                return response
            if self.eof:
                raise ConnectionError(f"closed before a whole response; buffered {bytes(self.parser.buffer)[:200]!r}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no whole response; buffered {bytes(self.parser.buffer)[:200]!r}")
            try:
                self._fill(deadline)
            except TimeoutError:
                continue

    def read_responses(self, count: int, timeout: float | None = None) -> list[RawResponse]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.read_response(max(0.01, deadline - time.monotonic())) for _ in range(count)]

    def closed_within(self, timeout: float) -> bool:
        """True when the server closes the connection within ``timeout`` (without sending more)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(deadline):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
            if self.parser.buffer:
                raise AssertionError(f"unexpected bytes: {bytes(self.parser.buffer)[:200]!r}")
        return self.eof

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def exchange(
    port: int, data: bytes, *, timeout: float = 10.0, head_only: bool = False
) -> tuple[list[RawResponse], bool]:
    """Send ``data`` on a new connection; every response until the server closes, and whether it did.

    The write side stays open, so only the server can end the exchange (or ``timeout``).
    """
    responses: list[RawResponse] = []
    with RawConnection(port, timeout=timeout) as conn:
        conn.send(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = conn.parser.next(eof=conn.eof, head_only=head_only)
            if response is not None:
                responses.append(response)
                continue
            if conn.eof:
                break
            try:
                conn._fill(deadline)
            except TimeoutError:
                break
        return responses, conn.eof


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str | None = "gateway",
    content_length: bool = True,
) -> bytes:
    """A well-formed request as bytes (the corpus builds malformed ones by hand)."""
    lines = [f"{method} {target} HTTP/1.1".encode()]
    if host is not None:
        lines.append(f"Host: {host}".encode())
    for name, value in headers or []:
        lines.append(f"{name}: {value}".encode("latin-1"))
    if content_length and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body)}".encode())
    return CRLF.join(lines) + CRLF + CRLF + body


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in chunked transfer coding, ``size`` bytes a chunk."""
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += f"{len(piece):x}".encode() + CRLF + piece + CRLF
    return bytes(out + b"0\r\n\r\n")


class AsyncRawConnection:
    """The asyncio twin of :class:`RawConnection`, for holding many sockets in one test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = ResponseParser()
        self.eof = False

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> AsyncRawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """False when the server has closed the connection already."""
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def read_response(self, within: float = 10.0) -> RawResponse:
        async with asyncio.timeout(within):
            while True:
                response = self.parser.next(eof=self.eof)
                if response is not None:
                    return response
                if self.eof:
                    raise ConnectionError("closed before a whole response")
                data = await self.reader.read(262144)
                if not data:
                    self.eof = True
                else:
                    self.parser.feed(data)

    async def wait_closed_by_peer(self, within: float) -> bool:
        """True when the server closes within ``within`` seconds; any bytes it sends first are kept."""
        try:
            async with asyncio.timeout(within):
                while True:
                    try:
                        data = await self.reader.read(65536)
                    except (ConnectionError, OSError):
                        return True
                    if not data:
                        self.eof = True
                        return True
                    self.parser.feed(data)
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass
