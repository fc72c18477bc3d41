"""A programmable loopback model server (aiohttp, in a thread of its own) that records what it was sent."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from gateway.redis_server import free_port

from .servers import AppThread


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    """A loopback aiohttp model server in a thread; tests program it and read what it saw."""

    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    # X-Request-Id of every slow stream whose caller (the gateway) went away before its end.
    cut_off: set[str] = field(default_factory=set)
    usage_tokens: int = 42
    # What GET .../models lists (the gateway answers a caller only the ones it may use).
    model_ids: list[str] = field(default_factory=lambda: ["gpt-mock"])
    _server: AppThread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.seen.clear()
        self.release = threading.Event()
        self.disconnected = threading.Event()

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), body))
        return body

    async def echo(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        headers = {
            "X-Upstream": "yes",
            "Connection": "X-Secret-Hop",
            "X-Secret-Hop": "leak",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
        }
        document = {
            "method": request.method,
            "path": request.raw_path,
            "body": body.decode("latin-1"),
            "headers": {str(k): v for k, v in request.headers.items()},
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": self.usage_tokens - 1,
                "total_tokens": self.usage_tokens,
            },
        }
        if request.path.endswith("/models"):  # an OpenAI-style model list, with the echo alongside
            document.update({"object": "list", "data": [{"id": m, "object": "model"} for m in self.model_ids]})
        return web.Response(body=orjson.dumps(document), content_type="application/json", headers=headers)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """First event at once, the rest only after ``release`` is set by the test."""
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        try:
            loop = asyncio.get_running_loop()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError
                if loop.time() > 1e12:  # pragma: no cover
                    break
            await response.write(b'data: {"n": 2}\n\n')
            usage = {
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": self.usage_tokens - 1,
                    "total_tokens": self.usage_tokens,
                }
            }
            await response.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    async def slow_stream(self, request: web.Request) -> web.StreamResponse:
        """After ``wait`` seconds (default 0), an event every ``every`` seconds (default 0.1) for ``events``
        events (default 100), each padded with ``pad`` bytes (default 0): SSE, or under ``/v1/slow-chunked``
        a chunked plain-text body."""
        await self._record(request)
        sse = not request.path.endswith("chunked")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream" if sse else "text/plain"})
        response.enable_chunked_encoding()
        every = float(request.query.get("every", "0.1"))
        size = int(request.query.get("pad", "0"))
        pad = f', "pad": "{"x" * size}"' if size else ""
        try:
            await asyncio.sleep(float(request.query.get("wait", "0")))
            await response.prepare(request)
            for n in range(int(request.query.get("events", "100"))):
                await response.write(
                    f'data: {{"n": {n}{pad}}}\n\n'.encode() if sse else f"part{n}{'x' * size};".encode()
                )
                await asyncio.sleep(every)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cut_off.add(request.headers.get("X-Request-Id", ""))
            raise
        return response

    async def stall(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(float(request.query.get("s", "30")))
        return web.Response(text="late")

    async def stall_mid_stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await asyncio.sleep(float(request.query.get("s", "30")))
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(f"part{i};".encode())
        await response.write_eof()
        return response

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/stream", self.stream)
        app.router.add_route("*", "/v1/stream", self.stream)
        app.router.add_route("*", "/stall", self.stall)
        app.router.add_route("*", "/stall-mid-stream", self.stall_mid_stream)
        app.router.add_route("*", "/chunked", self.chunked)
        app.router.add_route("*", "/v1/slow-stream", self.slow_stream)
        app.router.add_route("*", "/v1/slow-chunked", self.slow_stream)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    def start(self) -> Upstream:
        self._server = AppThread(self._app, self.port, name="test-upstream", handler_cancellation=True)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
