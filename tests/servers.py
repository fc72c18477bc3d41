"""Raw asyncio TCP servers for tests, each on an event loop and thread of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def serve_in_thread(handler: Handler, port: int, *, name: str,
                    **server_kwargs: Any) -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractServer, threading.Thread]:
    """Start ``asyncio.start_server(handler)`` on 127.0.0.1:``port`` in a daemon thread; return once it listens."""
    ready = threading.Event()
    started: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        started["loop"] = loop
        started["server"] = loop.run_until_complete(
            asyncio.start_server(handler, "127.0.0.1", port, **server_kwargs))
        ready.set()
        loop.run_forever()

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
