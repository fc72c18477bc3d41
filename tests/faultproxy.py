"""A small TCP fault proxy for tests: pass, refuse, blackhole, delay (with jitter) or reset traffic.

It sits between the gateway and Redis on loopback and covers what toxiproxy would.
The mode can change while connections are open; it applies to traffic from then on.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

from gateway.redis_server import free_port

from .servers import serve_in_thread


@dataclass
class FaultProxy:
    target_port: int
    port: int = field(default_factory=free_port)
    mode: str = "pass"  # pass | refuse | blackhole | delay | reset
    delay_s: float = 0.0
    jitter_s: float = 0.0
    connections: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set(self, mode: str, *, delay_s: float = 0.0, jitter_s: float = 0.0) -> None:
        """Switch mode; ``refuse`` and ``reset`` also cut the connections that are open now."""
        self.mode, self.delay_s, self.jitter_s = mode, delay_s, jitter_s
        if mode in ("refuse", "reset") and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while self.mode == "blackhole":  # noqa: ASYNC110 - the mode is set from another thread
                    await asyncio.sleep(0.01)
                if self.mode == "delay":
                    await asyncio.sleep(max(0.0, self.delay_s + random.uniform(-self.jitter_s, self.jitter_s)))
                if self.mode in ("refuse", "reset"):
                    _reset(writer)
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            _reset(client_writer)
            return
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(client_writer)
            return
        self._writers.update((client_writer, server_writer))
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        self._writers.discard(client_writer)
        self._writers.discard(server_writer)

    def start(self) -> FaultProxy:
        self._loop, self._server, self._thread = serve_in_thread(self._handle, self.port, name="fault-proxy")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        def shutdown() -> None:
            self._cut_all()
            if self._server is not None:
                self._server.close()
            assert self._loop is not None
            self._loop.stop()

        self._loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(5)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, as a crashed or firewalled peer would."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()
