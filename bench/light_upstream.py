"""A deliberately light model server for the ``--workers`` measurement.

The bench's aiohttp mock upstream costs about as much CPU per request as a
proxy does, so on a 2-core machine it takes the second worker's core. This one
answers every request with one fixed chat completion (with ``usage``, so the
gateway still charges tokens) from a bare asyncio protocol on uvloop: HTTP/1.1
keep-alive, request bodies by ``Content-Length`` only. It serves the bench's
load and nothing else.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from gateway.mock_upstream import MODELS, completion

BODY = orjson.dumps(completion(MODELS[0], 12))
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
