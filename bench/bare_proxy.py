"""The baseline: a bare aiohttp pass-through proxy (uvloop, one ClientSession, streamed answers)."""

from __future__ import annotations

import logging
import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(limit=1000))
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with app[session_key].request(
            request.method, upstream + request.raw_path, headers=headers, data=body or None, allow_redirects=False
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status,
                headers={k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP},
            )
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    import uvloop

    upstream, port = sys.argv[1], int(sys.argv[2])
    # wrk closes its connections mid-request when a run ends; aiohttp would print each as a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    web.run_app(
        create_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
