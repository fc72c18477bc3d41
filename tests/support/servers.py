"""Loopback servers for tests: raw asyncio TCP servers and aiohttp applications on threads of their own, a
JWKS server, a connection counter, and a background event loop to keep such servers serving beside blocking
test code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def serve_in_thread(
    handler: Handler, port: int, *, name: str, **server_kwargs: Any
) -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractServer, threading.Thread]:
    """Start ``asyncio.start_server(handler)`` on 127.0.0.1:``port`` in a daemon thread; return once it listens."""
    ready = threading.Event()
    started: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        started["loop"] = loop
        started["server"] = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", port, **server_kwargs))
        ready.set()
        loop.run_forever()
        # Stopped: end what is still running and close the loop, so that no task, socket or loop is left
        # for the garbage collector to warn about (warnings fail tests).
        started["server"].close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    ready.wait(5)
    return started["loop"], started["server"], thread


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request from ``reader``: its head returned, its Content-Length body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


class AppThread:
    """An aiohttp application served on a loopback port by a thread and an event loop of its own."""

    def __init__(self, make_app: Callable[[], web.Application], port: int, *, name: str, **runner_kwargs: Any) -> None:
        self.make_app, self.port, self.name, self.runner_kwargs = make_app, port, name, runner_kwargs
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            runner = web.AppRunner(self.make_app(), access_log=None, **self.runner_kwargs)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=self.name)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


class JwksServer:
    """A loopback HTTP server publishing a JWK set at ``/jwks.json``; counts hits, can fail or stall."""

    def __init__(self, document: Mapping[str, Any] | None = None) -> None:
        self.document: Any = dict(document or {"keys": []})
        self.hits = 0  # requests received
        self.served = 0  # responses completed
        self.status = 200
        self.delay_s = 0.0
        self.redirect_to: str | None = None
        self.raw_body: bytes | None = None
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let the requests stalled so far finish now; later ones stall for ``delay_s`` again."""
        self._release.set()
        self._release = asyncio.Event()

    async def __aenter__(self) -> JwksServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.delay_s)
        self.served += 1
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        body = self.raw_body if self.raw_body is not None else json.dumps(self.document).encode()
        return web.Response(body=body, content_type="application/json")


class ConnectionCounter:
    """A loopback TCP listener that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/keys"

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


class BackgroundLoop:
    """An asyncio loop in a daemon thread, so loopback servers (JwksServer, ConnectionCounter) keep
    serving a gateway process while test code blocks or runs an event loop of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-background-loop")
        self._thread.start()

    def run(self, coroutine: Any, timeout_s: float = 10.0) -> Any:
        """Run ``coroutine`` on the background loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call(self, function: Any, *args: Any) -> None:
        """Call ``function(*args)`` on the background loop (e.g. to set one of its asyncio.Events)."""
        self.loop.call_soon_threadsafe(function, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
