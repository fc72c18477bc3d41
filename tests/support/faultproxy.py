"""A small TCP fault proxy for tests: pass, refuse, blackhole, delay (with jitter) or reset traffic.

It sits between the gateway and Redis on loopback and covers what toxiproxy would.
The mode can change while connections are open; it applies to traffic from then on.

``start()`` runs it on a thread of the test process; ``start_process()`` in a process of its
own, for load tests: a thread shares the interpreter with the load generator, and under load it
is starved for longer than ``redis.timeout_s`` now and then, a delay nobody meant to inject.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    _control: Any = None  # a proxy process (start_process), told its modes over stdin
    _process: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set(self, mode: str, *, delay_s: float = 0.0, jitter_s: float = 0.0) -> None:
        """Switch mode; ``refuse`` and ``reset`` also cut the connections that are open now."""
        self.mode, self.delay_s, self.jitter_s = mode, delay_s, jitter_s
        if self._control is not None:
            self._control.stdin.write(f"{mode} {delay_s} {jitter_s}\n")
            self._control.stdin.flush()
            assert self._control.stdout.readline().strip() == "ok"  # applied
            return
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

    def start_process(self) -> FaultProxy:
        """Run the proxy in a child process; ``set`` and ``stop`` reach it over its stdin."""
        root = Path(__file__).resolve().parent.parent.parent
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.faultproxy", str(self.target_port), str(self.port)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None and self._process.stdout.readline().strip() == "ready"
        self._control = self._process
        return self

    def stop(self) -> None:
        if self._process is not None:
            process, self._process, self._control = self._process, None, None
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return
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


def _serve(target_port: int, port: int) -> None:
    """The body of a proxy process: serve on a thread, take "mode delay jitter" lines until stdin closes."""
    proxy = FaultProxy(target_port, port=port).start()
    print("ready", flush=True)
    for line in sys.stdin:
        mode, delay_s, jitter_s = line.split()
        proxy.set(mode, delay_s=float(delay_s), jitter_s=float(jitter_s))
        print("ok", flush=True)
    proxy.stop()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
