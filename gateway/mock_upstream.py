"""A development mock of an OpenAI-compatible model server (``gateway mock-upstream``).

A development aid only: it answers ``/v1/chat/completions`` (streaming or not),
``/v1/completions`` and ``/v1/models`` with canned text and a ``usage`` block,
so the gateway can be run and measured without a real model.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiohttp import web

# The models of config/policy.example.yaml, which `make run` loads, so every model the example policy
# names can be tried (and blocked) against the mock.
MODELS = ("gpt-mock", "frontier-x", "frontier-x-preview", "vision-7")
WORDS = "The gateway forwarded this answer from the development mock model server .".split()


def completion(model: str, prompt_tokens: int) -> dict[str, object]:
    text = " ".join(WORDS)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(WORDS),
            "total_tokens": prompt_tokens + len(WORDS),
        },
    }


async def _body(request: web.Request) -> dict[str, object]:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = {}
    return data if isinstance(data, dict) else {}


async def chat(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    model = str(data.get("model", "gpt-mock"))
    prompt_tokens = max(1, len(orjson.dumps(data.get("messages", []))) // 4)
    if not data.get("stream"):
        return web.Response(body=orjson.dumps(completion(model, prompt_tokens)), content_type="application/json")
    delay = float(request.query.get("delay", "0"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _stream_words(response, model, prompt_tokens, delay)
    except ConnectionResetError:
        pass  # the caller stopped reading (e.g. after the first event): nothing to report
    return response


async def _stream_words(response: web.StreamResponse, model: str, prompt_tokens: int, delay: float) -> None:
    ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    for word in WORDS:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if delay:
            await asyncio.sleep(delay)
    final = {
        "id": ident,
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(WORDS),
            "total_tokens": prompt_tokens + len(WORDS),
        },
    }
    await response.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()


async def models(_request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "mock"} for m in MODELS]}
        ),
        content_type="application/json",
    )


async def echo(request: web.Request) -> web.Response:
    """Anything else: echo what arrived (method, path, query, headers), handy for checking the proxy."""
    body = await request.read()
    headers = {str(k): v for k, v in request.headers.items()}
    return web.Response(
        body=orjson.dumps(
            {"method": request.method, "path": request.raw_path, "headers": headers, "body_bytes": len(body)}
        ),
        content_type="application/json",
    )


async def bulk(request: web.Request) -> web.StreamResponse:
    """``/v1/bulk?mb=N``: N MiB of SSE as fast as the reader takes it (for memory measurements)."""
    megabytes = min(int(request.query.get("mb", "1")), 1024)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    for _ in range(megabytes * 16):
        await response.write(chunk)
    await response.write_eof()
    return response


def create_mock_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/v1/bulk", bulk)  # the gateway forwards it only with a model named
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def run_mock(host: str, port: int) -> None:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    web.run_app(
        create_mock_app(),
        host=host,
        port=port,
        access_log=None,
        print=None,
        loop=loop_factory() if loop_factory else None,
    )
